"""One streaming pull: a version's chunks from whichever holders have them, into a slab here.

The pull advertises its slab as a partial replica from the start (registry `@s/` record and
`Serving`), so others stream from it while it fills. Its `tensord.fleet.policy.Plan` says what
to ask of whom; each source is a `Lane`: a connection of the pull's own to that holder (a long
poll there holds up nothing else) with a stream pin. Granted chunks are read one-sided with the
Transfer Engine into the slab, or, where the engine cannot reach the holder, sent by the holder
over a pair group (`tensord.fleet.pairs`).

When every chunk is here, every tensor's fingerprint is checked in one pass over the slab; a
chunk under a wrong fingerprint is fetched again from a complete replica (a relay may have
served bad bytes). Then the partial replica is promoted to a replica, once the chunks others
were granted from it are read.

A holder that fails (its connection or a read from it) is dropped: what was asked of it is
asked elsewhere, chunks redirected to it are forced onto a complete replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from tensord.fleet import pairs as pairmod
from tensord.fleet.chunks import Grid
from tensord.fleet.lanes import Lane, Reads, chunks_request, find_holders
from tensord.fleet.policy import Plan, Request
from tensord.fleet.progress import Progress
from tensord.fleet.serve import Partial
from tensord.fleet.settings import Pace
from tensord.records import Held
from tensord.registry.base import NodeRecord, PartialReplica
from tensord_contract.errors import NotFound, TensordError, TransferError, Unavailable
from tensord_contract.manifest import Manifest
from tensord_contract.streams import StreamChunksReply, pack_bitmap
from tensord_dataplane.transport.base import Batch

if TYPE_CHECKING:
    from tensord.context import NodeContext
    from tensord.fleet.pairs import Pairs
    from tensord.fleet.serve import Serving
    from tensord.fleet.settings import Settings
    from tensord.store import Store

log = logging.getLogger(__name__)

_VERIFY_ROUNDS = 3
_SLOW_READ = 50e6  # bytes/s: a read from a relay slower than this (after 2 x stall) is given up
_SETTLE = 300.0  # the longest a pull waits for reads it gave up on to end (the engine's timeout)


class Pull:
    def __init__(
        self,
        store: Store,
        context: NodeContext,
        serving: Serving,
        pairs: Pairs | None,
        manifest: Manifest,
        device: str,
        *,
        settings: Settings,
        host: str,
        token: str,
        pairs_timeout: float,
        start: int,
        peers: Iterable[str] = (),
        rate: int | None = None,
        chunk: int | None = None,
    ) -> None:
        self.store, self.context, self.serving, self.pairs = store, context, serving, pairs
        self.host, self.token, self.pairs_timeout = host, token, pairs_timeout
        self.manifest, self.device = manifest, device
        if rate is not None:
            settings = dataclasses.replace(settings, rate=rate)
        if chunk is not None:
            settings = dataclasses.replace(settings, chunk=chunk)
        self.settings = settings
        self.me = context.node
        self.grid = Grid(manifest.nbytes, self.settings.chunk_for(manifest.nbytes))
        s = self.settings
        self.plan = Plan(
            self.me,
            self.grid.count,
            start=start,
            batch=s.batch,
            window=s.window,
            stall=s.stall,
            max_sources=s.sources,
        )
        self.partial: Partial | None = None
        self.lanes: dict[str, Lane] = {}
        self.records: dict[str, NodeRecord] = {}
        self.co_pullers = [p for p in peers if p != self.me]
        self.progress = Progress()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pushes: set[Future[None]] = set()  # receives queued on pair groups, not done yet
        self._reads = Reads()
        self._asking: dict[str, set[asyncio.Task[None]]] = {}  # node -> requests out to it
        self._advertised = -1
        self._pace = Pace(self.settings.rate)
        self._error: str = ""

    # -- the whole pull -----------------------------------------------------------------------
    async def run(self) -> Held:
        name, version = self.manifest.name, self.manifest.version
        store = self.store
        await store.make_room(self.device, self.manifest.nbytes)  # evicts what can come back, if that is on
        slab = store.allocate(self.device, self.manifest.nbytes, f"{name}@{version}~")
        address = 0
        try:
            if store.reaches(slab.device):
                address = store.expose(slab, writable=True)
            self.partial = Partial(self.manifest, slab, self.grid, address, held=np.zeros(self.grid.count, dtype=bool))
        except BaseException:
            store.discard(slab)
            raise
        serving = self.serving
        serving.add(self.partial)
        held: Held | None = None
        try:
            await self._advertise(force=True)
            await self._discover()
            self.progress.phase("setup")
            for round_ in range(_VERIFY_ROUNDS):
                await self._fetch()
                self.progress.phase("fetch")
                await self._let_go()
                if self._reads.running:
                    raise TransferError(f"reads into {name} v{version} did not end", name=name, version=version)
                bad = await asyncio.to_thread(self.partial.wrong_chunks)
                self.progress.phase("check")
                if not len(bad):
                    break
                log.warning(
                    "pull of %s v%d: %d chunks failed their fingerprints (round %d); fetching them again",
                    name,
                    version,
                    len(bad),
                    round_ + 1,
                )
                self.plan.lost(bad.tolist())
                self.partial.held[bad] = False
            else:
                raise TransferError(
                    f"{name} v{version} kept arriving with wrong fingerprints", name=name, version=version
                )
            held = await self._promote()
            self.progress.phase("promote")
            return held
        finally:
            await self._finish(held)

    async def _promote(self) -> Held:
        assert self.partial is not None
        partial, store, serving = self.partial, self.store, self.serving
        partial.pulling = False
        await serving.changed(partial)  # requests waiting on it decide again: it has everything
        if not await serving.drained(partial, 2 * self.settings.wait + 1.0):
            log.warning("%s v%d: chunks granted from the partial replica still unread; promoting anyway", *partial.key)
        partial.owned = False  # the store's now: adopt frees it if it cannot advertise it
        held = await store.adopt(self.manifest, partial.slab)
        await serving.stopped(partial, held)
        return held

    async def _let_go(self) -> None:
        """Every chunk is here: stop asking. Requests still out (long polls) are abandoned with
        their connections (the holder then forgets this node); the other lanes are released
        cleanly. Pullers waiting on this node's own grants to be read must not wait on this."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pushes:  # receives write into the slab (or hold it mapped): let them end first
            _, late = await asyncio.wait([asyncio.wrap_future(f) for f in self._pushes], timeout=self.pairs_timeout)
            if late:
                log.warning("%d pair-group receives into %s still running", len(late), self.manifest.name)
        if await self._reads.settle(_SETTLE):
            log.error("%s: Transfer Engine reads into its slab still run after %.0f s", self.manifest.name, _SETTLE)
        lanes, self.lanes = list(self.lanes.values()), {}
        await asyncio.gather(*(lane.release() for lane in lanes), return_exceptions=True)

    async def _finish(self, held: Held | None) -> None:
        """Let every lane go, withdraw the partial replica record; on failure give the slab up
        (freed when the last stream pinned on it goes)."""
        await self._let_go()
        partial = self.partial
        if partial is None:
            return
        if self._reads.running:
            self.serving.keep(partial)  # a read still writes into the slab: it is never freed
        if held is None:
            await self.serving.stopped(partial, None)
        with contextlib.suppress(TensordError):
            await self.context.registry.remove_partial(*partial.key, self.me, partial.slab.device)

    # -- fetching -----------------------------------------------------------------------------
    async def _fetch(self) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        next_refresh = loop.time() + s.refresh
        next_advertise = loop.time() + s.advertise
        while not self.plan.done:
            self._wake.clear()
            now = loop.time()
            for req in self.plan.next_requests(now):
                self._spawn(self._exchange(req))
            if not self.plan.sources and not self._tasks:
                raise TransferError(
                    f"no holder of {self.manifest.name} v{self.manifest.version} is left to pull from"
                    + (f": {self._error}" if self._error else ""),
                    name=self.manifest.name,
                    version=self.manifest.version,
                )
            wake = min(next_refresh, next_advertise)
            if self.plan.hints:
                wake = min(wake, min(since for _, since in self.plan.hints.values()) + s.stall)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wake - loop.time(), 0.001))
            now = loop.time()
            if now >= next_advertise:
                await self._advertise()
                next_advertise = now + s.advertise
            if now >= next_refresh:
                await self._discover()
                next_refresh = now + s.refresh

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exchange(self, req: Request) -> None:
        """Send one request, read what it grants."""
        task = asyncio.current_task()
        assert task is not None
        self._asking.setdefault(req.node, set()).add(task)
        try:
            lane = await self._lane(req.node)
            if lane.push:
                await self._exchange_pushed(lane, req)
                return
            assert lane.pin is not None
            async with lane.lock:
                reply = await lane.ask(
                    chunks_request(lane.pin, self.settings.wait, req, self.plan.start), self.grid.count
                )
            read = self._answer(lane, req, reply)
            if read:
                await self._pace.wait(self.grid.bytes_of(read))
                await self._read(lane, read, reply.address or lane.address)
        except (TensordError, OSError) as exc:
            self._fail(req.node, exc)
        finally:
            self._asking.get(req.node, set()).discard(task)
            self._wake.set()

    async def _exchange_pushed(self, lane: Lane, req: Request) -> None:
        """The same over a pair group: the holder sends what it grants, numbered; the receive
        is queued (in that order) before the lane takes its next request, so a next batch may
        be asked for while this one arrives."""
        pairs = self.pairs
        assert pairs is not None
        assert self.partial is not None
        mine = self.partial.slab.device
        group = await pairs.receiver(lane.node, mine, lane.device, lane.joiner(self.pairs_timeout))
        assert lane.pin is not None
        async with lane.lock:
            reply = await lane.ask(
                chunks_request(lane.pin, self.settings.wait, req, self.plan.start, push=mine), self.grid.count
            )
            granted = reply.granted
            read = self._answer(lane, req, reply)
            if not granted:
                return
            seq = reply.seq
            if seq is None or seq < 0:
                raise Unavailable(f"node {lane.node} has no pair group to send to this node")
            done = pairs.receive(group, seq, self.partial.slab, self.grid, granted, set(read))
            self._pushes.add(done)
            done.add_done_callback(self._pushes.discard)
        await self._pace.wait(self.grid.bytes_of(read))
        t0 = time.monotonic()
        try:  # shielded: a receive under way runs to its end (the holder sends anyway)
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), pairs.timeout)
        except TimeoutError as exc:
            group.abandon()
            raise TransferError(f"{lane.node} sent nothing for {pairs.timeout:.0f} s") from exc
        await self._arrived(lane, read, time.monotonic() - t0)

    def _answer(self, lane: Lane, req: Request, a: StreamChunksReply) -> list[int]:
        read, fresh = self.plan.on_reply(
            lane.node,
            req,
            a.granted,
            a.redirect,
            asyncio.get_running_loop().time(),
            have=a.have,
            busy=a.busy,
            complete=a.complete,
            gone=a.gone,
            full=a.full,
        )
        for node in fresh:
            record = self.records.get(node)
            if record is not None:
                self.plan.offer(node, complete=False, same_host=record.host == self.host)
        if a.gone:
            self._drop_lane(lane.node)
        return read

    async def _read(self, lane: Lane, chunks: list[int], address: int) -> None:
        assert self.partial is not None
        transport = self.context.transport
        if transport is None or not lane.session or not address:
            raise Unavailable(f"no Transfer Engine path from {lane.node}")
        starts, lengths = self.grid.ranges(chunks)
        batch = Batch(self.partial.address + starts, address + starts, lengths)
        t0 = time.monotonic()
        # a relay that stops answering must not hold chunks for the engine's whole timeout
        bound = None if lane.complete else 2 * self.settings.stall + batch.nbytes / _SLOW_READ
        try:
            await self._reads.read(transport, lane.session, batch, bound)
        except TransferError as exc:
            if await self._engine_unreachable(lane):
                # its control plane answers but its engine cannot be read from here: it sends
                # over a pair group from now on, and these chunks are asked again
                log.warning("engine read from %s failed (%s); switching to a pair group", lane.node, exc.message)
                lane.push = True
                self.plan.retry(lane.node, chunks)
                return
            raise
        await self._arrived(lane, chunks, time.monotonic() - t0)

    async def _engine_unreachable(self, lane: Lane) -> bool:
        """After a failed engine read: whether `lane`'s holder still answers (then its engine
        is what cannot be reached, and a pair group may do), rather than being gone."""
        assert self.partial is not None
        if not self.settings.pairs or self.pairs is None or self.lanes.get(lane.node) is not lane:
            return False
        if not pairmod.available(self.partial.slab.device)[0]:
            return False
        return await lane.alive()

    async def _arrived(self, lane: Lane, chunks: list[int], seconds: float) -> None:
        assert self.partial is not None
        if not chunks:
            return
        nbytes = self.grid.bytes_of(chunks)
        self.progress.arrived(lane.node, nbytes)
        self.plan.received(lane.node, chunks)
        await self.serving.arrived(self.partial, chunks)
        log.debug("%d chunks (%d bytes) from %s in %.4f s", len(chunks), nbytes, lane.node, seconds)

    def _fail(self, node: str, exc: BaseException) -> None:
        message = getattr(exc, "message", str(exc))
        log.info("pull of %s v%d: dropping source %s: %s", self.manifest.name, self.manifest.version, node, message)
        self._error = f"{node}: {message}"
        self.plan.fail(node)
        self._drop_lane(node)
        for task in self._asking.pop(node, set()) - {asyncio.current_task()}:
            task.cancel()  # requests still out to it: the plan asks for their chunks elsewhere

    def _drop_lane(self, node: str) -> None:
        lane = self.lanes.pop(node, None)
        if lane is not None:
            self._spawn(lane.peer.close())

    # -- lanes --------------------------------------------------------------------------------
    async def _lane(self, node: str) -> Lane:
        lane = self.lanes.get(node)
        if lane is not None and lane.pin is not None:
            return lane
        record = self.records.get(node)
        if record is None:
            await self._nodes()
            record = self.records.get(node)
        if record is None:
            raise NotFound(f"node {node} is not live")
        if not record.control.startswith("tcp:"):
            raise Unavailable(f"node {node} has no TCP listener")
        if lane is None:
            timeout = self.settings.wait + 30
            lane = self.lanes[node] = Lane.connect(record, self.token, timeout)
        async with lane.lock:
            if lane.pin is not None:
                return lane
            have, busy = await lane.open(self.manifest, self.grid, self.me)
            transport = self.context.transport
            lane.push = not (transport is not None and lane.session and lane.address)
            if lane.push:
                assert self.partial is not None
                ok, why = pairmod.available(self.partial.slab.device, lane.device)
                if not (self.settings.pairs and ok and self.pairs is not None):
                    raise Unavailable(f"no Transfer Engine path from {node}, and no pair group ({why or 'off'})")
            self.plan.offer(node, complete=lane.complete, have=have, busy=busy)
        return lane

    # -- the registry -------------------------------------------------------------------------
    async def _nodes(self) -> None:
        with contextlib.suppress(Unavailable):
            self.records = {r.node: r for r in await self.context.registry.nodes()}
            gone = [n for n in self.lanes if n not in self.records] if self.me in self.records else []
            for node in gone:  # its lease expired (judged only while this node's own lease holds)
                self._fail(node, Unavailable(f"node {node} lost its lease (dead or frozen)"))

    async def _discover(self) -> None:
        """Offer the plan every holder the registry knows of, and the other targets of a fan-out."""
        await self._nodes()
        registry, host = self.context.registry, self.host
        for o in await find_holders(registry, self.records, self.manifest, self.grid, self.me, host, self.co_pullers):
            self.plan.offer(o.node, complete=o.complete, have=o.have, same_host=o.same_host)

    async def _advertise(self, *, force: bool = False) -> None:
        partial = self.partial
        assert partial is not None
        held = int(partial.held.sum())
        if held == self._advertised and not force:
            return
        record = PartialReplica(
            *partial.key, self.me, partial.slab.device, self.grid.size, self.grid.count, pack_bitmap(partial.held)
        )
        try:
            await self.context.registry.put_partial(record)
            self._advertised = held
        except Unavailable as exc:
            log.info("cannot advertise the partial replica of %s v%d: %s", *partial.key, exc.message)

    def status(self) -> dict[str, Any]:
        m = self.manifest
        return self.progress.status(m.name, m.version, self.grid.count, self.grid.size, self.plan.held)
