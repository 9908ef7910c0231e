"""The holder's side of streaming pulls: partial replicas being filled on this node, chunks of
partial and complete replicas granted to pullers on other nodes, and what that costs (egress).

A puller opens a *stream pin* on a holder (`stream_open`): it keeps the replica (complete or
partial) from being freed while the pin lasts, like a read pin. Then it asks for chunks
(`stream_chunks`); the holder answers by `tensord.fleet.policy.Book`: chunks granted (read them
now, one-sided, from the slab at the address the answer gives), redirects, or nothing yet (the
request waited up to `wait` seconds for a chunk or a free slot). The next request acknowledges
the chunks read. Granted bytes are this node's egress, counted here.

A partial replica is never in `Store.held`: nothing that serves readers (open, mount, get, info's
replicas) can see it. When its pull completes and every fingerprint checked, the pull promotes
it (`Store.adopt`) once the chunks granted from it are read, and streams pinned on it then go on
against the complete replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensord.context import NodeContext
from tensord.fleet.chunks import Grid
from tensord.fleet.policy import Book, Request, rotation
from tensord.memory import Slab, own_view
from tensord.records import Held
from tensord.store import Store
from tensord_contract.errors import InvalidArgument, NotFound, Unavailable
from tensord_contract.manifest import Manifest
from tensord_contract.streams import StreamChunksReply, StreamOpenReply
from tensord_dataplane.fingerprint import mismatched_rows

log = logging.getLogger(__name__)

_ORDERS = 64  # rotations cached per served version
_ORDER_ENTRIES = 1 << 20  # at most this many chunk indices cached per served version (8 MiB)
_SERVED = 256  # versions whose grants a holder remembers


@dataclass(eq=False)
class Partial:
    """A replica being filled by a streaming pull on this node."""

    manifest: Manifest
    slab: Slab
    grid: Grid
    address: int = 0  # the slab in this node's Transfer Engine (0: none)
    held: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    arrivals: list[int] = field(default_factory=list)  # chunks held, in the order they came
    pulling: bool = True  # its pull still runs: chunks it lacks are on their way
    pins: int = 0
    dropped: bool = False  # the pull gave up: the slab goes with the last pin
    promoted: Held | None = None  # the complete replica it became
    owned: bool = True  # False once handed to Store.adopt (which frees it if adopting fails)

    @property
    def key(self) -> tuple[str, int]:
        return self.manifest.name, self.manifest.version

    def wrong_chunks(self) -> np.ndarray:
        """The chunks holding a tensor whose fingerprint is wrong (empty: all good)."""
        m = self.manifest
        view = own_view(self.slab)
        try:
            actual = view.fingerprints(m.offsets, m.sizes, m.fp_version)
        finally:
            view.close()
        bad = mismatched_rows(m.fingerprints, actual)
        if not len(bad):
            return np.zeros(0, dtype=np.int64)
        return self.grid.covering(m.offsets[bad], m.sizes[bad])


@dataclass(eq=False)
class StreamPin:
    """A puller's hold on a replica it streams from (lives in the puller's session here; a
    `tensord.rpc.Pin`)."""

    key: tuple[str, int]
    chunk: int
    requester: str
    target: Held | Partial
    serving: Serving

    async def release(self, *, clean: bool) -> bool:
        return await self.serving.unpin(self, clean=clean)


@dataclass(eq=False)
class _Served:
    book: Book
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    orders: dict[int, np.ndarray] = field(default_factory=dict)
    pins: int = 0  # stream pins on it: when the last goes, so does what it holds


class Serving:
    def __init__(self, store: Store, context: NodeContext, *, slots: int, wait: float) -> None:
        self.store, self.context, self.node = store, context, context.node
        self.slots, self.wait = slots, wait
        self.grant_ttl = max(5.0, 10 * wait)  # a grant unread this long gives its slot back
        self.partials: dict[tuple[str, int], Partial] = {}
        self._served: dict[tuple[str, int, int], _Served] = {}
        self.egress_chunks = 0  # bytes of chunks granted to streaming pullers
        self.egress_reads = 0  # bytes of whole slabs pinned for remote readers (open: `served_read`)
        self.streams = 0  # stream pins held by pullers
        self.pusher: Any = None  # tensord.fleet.pairs.Pairs, when pair groups are on

    def served_read(self, nbytes: int) -> None:
        """A reader on another node pinned a whole version here (`open`)."""
        self.egress_reads += nbytes

    # -- partial replicas of this node --------------------------------------------------------
    def add(self, partial: Partial) -> None:
        self.partials[partial.key] = partial

    async def arrived(self, partial: Partial, chunks: list[int]) -> None:
        partial.held[chunks] = True
        partial.arrivals.extend(chunks)
        await self._notify(partial.key)

    def keep(self, partial: Partial) -> None:
        """A read still writes into `partial`'s slab after its pull ended: it is never freed
        (one pin nobody releases)."""
        partial.pins += 1

    async def changed(self, partial: Partial) -> None:
        """Requests waiting on `partial` decide again (its pull stopped asking, say)."""
        await self._notify(partial.key)

    async def stopped(self, partial: Partial, promoted: Held | None) -> None:
        """Its pull ended: promoted to `promoted`, or given up (`promoted` None)."""
        partial.pulling = False
        if self.partials.get(partial.key) is partial:
            del self.partials[partial.key]
        if promoted is not None:
            partial.promoted = promoted
            if partial.pins:  # the streams pinned on it now pin the replica
                self.store.pin(promoted, partial.pins)
            partial.pins = 0
        else:
            partial.dropped = True
            if not partial.pins and partial.owned:
                self.store.discard(partial.slab)
        await self._notify(partial.key)

    async def drained(self, partial: Partial, timeout: float) -> bool:
        """Wait until every chunk granted from `partial` was read (or `timeout`); True if so."""
        deadline = time.monotonic() + timeout
        entries = [s for (n, v, _), s in self._served.items() if (n, v) == partial.key]
        for served in entries:
            async with served.changed:
                while served.book.busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(served.changed.wait(), left)
        return True

    # -- the ops ------------------------------------------------------------------------------
    def open(self, name: str, version: int, requester: str, chunk: int) -> tuple[StreamOpenReply, StreamPin]:
        """Pin the version (or the pull of it under way here) for `requester`; the reply's pin
        is the session's to number."""
        held = self.store.holds(name, version)
        if held is not None and held.slab.published:
            raise Unavailable(f"{name} v{version} lies in a publishing process's memory on node {self.node}")
        if held is not None:
            grid = Grid(held.manifest.nbytes, chunk)
            self.store.pin(held)
            target: Held | Partial = held
            have = None
            replica = self.store.replica(held)
            address, session = replica.address, replica.transport
            slab = held.slab
        else:
            partial = self.partials.get((name, version))
            if partial is None or partial.dropped:
                raise NotFound(f"{name} v{version} is not held or being pulled on node {self.node}")
            if partial.grid.size != chunk:
                raise InvalidArgument(
                    f"node {self.node} pulls {name} v{version} in chunks of {partial.grid.size} bytes, "
                    f"not {chunk} (keep fleet.chunk_bytes the same on every node)"
                )
            grid = partial.grid
            partial.pins += 1
            target = partial
            have = partial.held.copy()
            address = partial.address
            session = self.context.transport.session if self.context.transport is not None and address else ""
            slab = partial.slab
        served = self._entry(name, version, chunk)
        served.pins += 1
        self.streams += 1
        pin = StreamPin((name, version), chunk, requester, target, self)
        reply = StreamOpenReply(
            0, chunk, grid.count, have, served.book.busy, session, address, slab.nbytes, slab.generation, slab.device
        )
        return reply, pin

    async def chunks(
        self, pin: StreamPin, request: Request, *, start: int, wait: float, push: str | None
    ) -> StreamChunksReply:
        """Grant chunks of the pinned version (waiting up to `wait` s for some); `push`: the
        device of the puller's slab, to send them over a pair group rather than be read."""
        name, version = pin.key
        served = self._entry(name, version, pin.chunk)
        book = served.book
        if request.done or request.declined:
            book.ack(pin.requester, request.done)
            if request.declined:  # granted, counted, then not read after all
                declined = book.decline(pin.requester, request.declined)  # only what it was granted
                self.egress_chunks -= Grid(pin.target.manifest.nbytes, pin.chunk).bytes_of(declined)
            await self._notify(pin.key)
        deadline = time.monotonic() + min(max(wait, 0.0), self.wait)
        async with served.changed:
            while True:
                target, held, partial = self._target(pin)
                if target is None:
                    return StreamChunksReply(gone=True)
                grid = Grid(target.manifest.nbytes, pin.chunk)
                if not request.asks:
                    decision = None
                    break
                order = None
                if request.want is not None:
                    order = served.orders.get(start)
                    if order is None:
                        if len(served.orders) >= min(_ORDERS, _ORDER_ENTRIES // grid.count):
                            served.orders.clear()
                        order = served.orders[start] = rotation(start, grid.count)
                decision = book.decide(
                    pin.requester,
                    request,
                    held=None if partial is None else partial.held,
                    coming=partial is not None and partial.pulling,
                    order=order,
                    arrivals=None if partial is None else partial.arrivals,
                    now=time.monotonic(),
                )
                left = deadline - time.monotonic()
                if decision.final or left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(served.changed.wait(), left)
        granted = decision.granted if decision is not None else []
        if granted:
            self.egress_chunks += grid.bytes_of(granted)
        seq = None
        if push and granted:
            assert self.pusher is not None
            seq = self.pusher.send(pin.requester, push, target, grid, granted)
        if partial is not None:
            address = partial.address
        else:
            assert held is not None
            address = self.store.replica(held).address
        return StreamChunksReply(
            granted,
            dict(decision.redirect) if decision is not None else {},
            None if partial is None else partial.held.copy(),
            partial is None,
            book.busy,
            bool(decision is not None and decision.gone),
            bool(decision is not None and decision.full),
            address,
            seq,
        )

    def _target(self, pin: StreamPin) -> tuple[Held | Partial | None, Held | None, Partial | None]:
        t = pin.target
        if isinstance(t, Partial):
            if t.promoted is not None:
                t = t.promoted
            elif t.dropped:
                return None, None, None
            else:
                return t, None, t
        return (t, t, None) if t.live else (None, None, None)

    def count(self, pin: StreamPin) -> int:
        """Chunks in the grid this pin streams in."""
        return Grid(pin.target.manifest.nbytes, pin.chunk).count

    async def unpin(self, pin: StreamPin, *, clean: bool) -> bool:
        """The puller released the pin (`clean`) or its session closed: its grants end; after a
        closed session nobody is redirected to it any more (it may be dead)."""
        self.streams -= 1
        key = (*pin.key, pin.chunk)
        served = self._served.get(key)
        if served is not None:
            if clean:
                served.book.release(pin.requester)
            else:
                served.book.forget(pin.requester)
            served.pins -= 1
            if served.pins <= 0 and not served.book.busy:
                # nobody streams it: its book, redirects and cached orders go
                del self._served[key]
        t = pin.target
        if isinstance(t, Partial):
            if t.promoted is not None:
                t = t.promoted
            else:
                t.pins -= 1
                if t.dropped and not t.pins and t.owned:
                    self.store.discard(t.slab)
                await self._notify(pin.key)
                return True
        self.store.unpin(t)
        await self._notify(pin.key)
        return True

    # -- internals ----------------------------------------------------------------------------
    def _entry(self, name: str, version: int, chunk: int) -> _Served:
        key = (name, version, chunk)
        served = self._served.get(key)
        if served is None:
            idle = [k for k, v in self._served.items() if not v.book.busy]
            for k in idle[: max(0, len(self._served) - _SERVED)]:  # the oldest idle ones go
                del self._served[k]
            served = self._served[key] = _Served(Book(self.slots, ttl=self.grant_ttl))
        return served

    async def _notify(self, key: tuple[str, int]) -> None:
        for (n, v, _), served in list(self._served.items()):
            if (n, v) == key:
                async with served.changed:
                    served.changed.notify_all()

    def status(self) -> dict[str, Any]:
        return {
            "bytes": self.egress_chunks + self.egress_reads,
            "chunks": self.egress_chunks,
            "reads": self.egress_reads,
            "streams": self.streams,
            "served": len(self._served),
            "busy": sum(s.book.busy for s in self._served.values()),
        }
