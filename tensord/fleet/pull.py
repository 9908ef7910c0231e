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

from sdk.transport.base import Batch
from tensord.fleet import chunks as chunkmap
from tensord.fleet import pairs as pairmod
from tensord.fleet.chunks import Grid
from tensord.fleet.policy import Plan, Request
from tensord.fleet.serve import Partial
from tensord.held import Held
from tensord.memory import own_view
from tensord.peers import Peer
from tensord.registry.base import NodeRecord, PartialReplica
from tensord_contract.errors import NotFound, ProtocolError, TensordError, TransferError, Unavailable
from tensord_contract.manifest import Manifest

if TYPE_CHECKING:
    from tensord.cluster import Cluster

log = logging.getLogger(__name__)

_VERIFY_ROUNDS = 3


class Lane:
    """This pull's connection to one holder, and what the holder said about its slab."""

    def __init__(self, node: str, peer: Peer) -> None:
        self.node, self.peer = node, peer
        self.pin: int | None = None
        self.session = ""
        self.address = 0
        self.complete = False
        self.push = False  # the holder sends over a pair group: no Transfer Engine read
        self.device = ""  # where the holder's slab lies
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()  # one exchange at a time (the peer connection is one stream)


class Pull:
    def __init__(
        self,
        cluster: Cluster,
        manifest: Manifest,
        device: str,
        *,
        start: int,
        peers: Iterable[str] = (),
        rate: int | None = None,
        chunk: int | None = None,
    ) -> None:
        self.cluster, self.manifest, self.device = cluster, manifest, device
        settings = cluster.settings
        if rate is not None:
            settings = dataclasses.replace(settings, rate=rate)
        if chunk is not None:
            settings = dataclasses.replace(settings, chunk=chunk)
        self.settings = settings
        self.me = cluster.store.node
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
        self.started = time.monotonic()
        self.phases: dict[str, float] = {}  # seconds spent setting up, fetching, checking, promoting
        self._mark = self.started
        self.bytes = 0
        self.sourced: dict[str, int] = {}  # bytes per source
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pushes: set[Future[None]] = set()  # receives queued on pair groups, not done yet
        self._advertised = -1
        self._rate_start = 0.0
        self._rate_bytes = 0
        self._error: str = ""

    # -- the whole pull -----------------------------------------------------------------------
    async def run(self) -> Held:
        name, version = self.manifest.name, self.manifest.version
        store = self.cluster.store
        slab = store.allocate(self.device, self.manifest.nbytes, f"{name}@{version}~")
        address = 0
        try:
            if store.reaches(slab.device):
                address = store.expose(slab, writable=True)
            self.partial = Partial(self.manifest, slab, self.grid, address, held=np.zeros(self.grid.count, dtype=bool))
        except BaseException:
            store.discard(slab)
            raise
        serving = self.cluster.serving
        serving.add(self.partial)
        held: Held | None = None
        try:
            await self._advertise(force=True)
            await self._discover()
            self._phase("setup")
            for round_ in range(_VERIFY_ROUNDS):
                await self._fetch()
                self._phase("fetch")
                await self._let_go()
                bad = await asyncio.to_thread(self._check)
                self._phase("check")
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
            self._phase("promote")
            return held
        finally:
            await self._finish(held)

    async def _promote(self) -> Held:
        assert self.partial is not None
        partial, store, serving = self.partial, self.cluster.store, self.cluster.serving
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
            _, late = await asyncio.wait(
                [asyncio.wrap_future(f) for f in self._pushes], timeout=self.cluster.pairs_timeout
            )
            if late:
                log.warning("%d pair-group receives into %s still running", len(late), self.manifest.name)
        lanes, self.lanes = list(self.lanes.values()), {}
        await asyncio.gather(*(self._release(lane) for lane in lanes), return_exceptions=True)

    async def _finish(self, held: Held | None) -> None:
        """Let every lane go, withdraw the partial replica record; on failure give the slab up
        (freed when the last stream pinned on it goes)."""
        await self._let_go()
        partial = self.partial
        if partial is None:
            return
        if held is None:
            await self.cluster.serving.stopped(partial, None)
        with contextlib.suppress(TensordError):
            await self.cluster.store.registry.remove_partial(*partial.key, self.me, partial.slab.device)

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
        try:
            lane = await self._lane(req.node)
            if lane.push:
                await self._exchange_pushed(lane, req)
                return
            async with lane.lock:
                result, _ = await lane.peer.call("stream_chunks", **self._args(lane, req))
            read = self._answer(lane, req, result)
            if read:
                await self._throttle(read)
                await self._read(lane, read, int(result.get("address") or lane.address))
        except (TensordError, OSError) as exc:
            self._fail(req.node, exc)
        finally:
            self._wake.set()

    async def _exchange_pushed(self, lane: Lane, req: Request) -> None:
        """The same over a pair group: the holder sends what it grants, numbered; the receive
        is queued (in that order) before the lane takes its next request, so a next batch may
        be asked for while this one arrives."""
        pairs = self.cluster.pairs
        assert pairs is not None
        assert self.partial is not None
        mine = self.partial.slab.device
        group = await pairs.receiver(lane.node, mine, lane.device, self._joiner(lane))
        async with lane.lock:
            result, _ = await lane.peer.call("stream_chunks", push=True, device=mine, **self._args(lane, req))
            granted = [int(c) for c in result.get("granted") or []] if isinstance(result, dict) else []
            read = self._answer(lane, req, result)
            if not granted:
                return
            seq = result.get("seq")
            if type(seq) is not int or seq < 0:
                raise Unavailable(f"node {lane.node} has no pair group to send to this node")
            done = pairs.receive(group, seq, self.partial.slab, self.grid, granted, set(read))
            self._pushes.add(done)
            done.add_done_callback(self._pushes.discard)
        await self._throttle(read)
        t0 = time.monotonic()
        try:  # shielded: a receive under way runs to its end (the holder sends anyway)
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), pairs.timeout)
        except TimeoutError as exc:
            group.abandon()
            raise TransferError(f"{lane.node} sent nothing for {pairs.timeout:.0f} s") from exc
        await self._arrived(lane, read, time.monotonic() - t0)

    def _args(self, lane: Lane, req: Request) -> dict[str, Any]:
        args: dict[str, Any] = {"pin": lane.pin, "wait": self.settings.wait}
        if req.done:
            args["done"] = req.done
        if req.declined:
            args["declined"] = req.declined
        if req.chunks:
            args["chunks"] = req.chunks
            if req.force:
                args["force"] = req.force
        if req.want is not None:
            args["want"] = chunkmap.pack(req.want)
            args["limit"] = req.limit
            args["start"] = self.plan.start
        return args

    def _answer(self, lane: Lane, req: Request, result: Any) -> list[int]:
        if not isinstance(result, dict):
            raise ProtocolError(f"node {lane.node} answered a chunk request with {type(result).__name__}")
        count = self.grid.count
        granted = chunkmap.chunk_list(result.get("granted"), count, "granted")
        redirect: dict[int, str] = {}
        for pair in result.get("redirect") or []:
            if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or not isinstance(pair[1], str):
                raise ProtocolError(f"node {lane.node} sent a malformed redirect")
            if 0 <= pair[0] < count:
                redirect[pair[0]] = pair[1]
        have = result.get("have")
        read, fresh = self.plan.on_reply(
            lane.node,
            req,
            granted,
            redirect,
            asyncio.get_running_loop().time(),
            have=None if have is None else chunkmap.unpack(have, count),
            busy=int(result.get("busy") or 0),
            complete=bool(result.get("complete")),
            gone=bool(result.get("gone")),
            full=bool(result.get("full")),
        )
        for node in fresh:
            record = self.records.get(node)
            if record is not None:
                self.plan.offer(node, complete=False, same_host=record.host == self.cluster.host)
        if result.get("gone"):
            self._drop_lane(lane.node)
        return read

    async def _read(self, lane: Lane, chunks: list[int], address: int) -> None:
        assert self.partial is not None
        transport = self.cluster.store.transport
        if transport is None or not lane.session or not address:
            raise Unavailable(f"no Transfer Engine path from {lane.node}")
        starts, lengths = self.grid.ranges(chunks)
        batch = Batch(self.partial.address + starts, address + starts, lengths)
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(transport.read, lane.session, batch)
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
        if not self.settings.pairs or self.cluster.pairs is None or self.lanes.get(lane.node) is not lane:
            return False
        if not pairmod.available(self.partial.slab.device)[0]:
            return False
        try:
            async with lane.lock:
                await lane.peer.call("stream_chunks", pin=lane.pin, reply_timeout=5.0)
        except TensordError:
            return False
        return True

    async def _arrived(self, lane: Lane, chunks: list[int], seconds: float) -> None:
        assert self.partial is not None
        if not chunks:
            return
        nbytes = self.grid.bytes_of(chunks)
        self.bytes += nbytes
        self.sourced[lane.node] = self.sourced.get(lane.node, 0) + nbytes
        self.plan.received(lane.node, chunks)
        await self.cluster.serving.arrived(self.partial, chunks)
        log.debug("%d chunks (%d bytes) from %s in %.4f s", len(chunks), nbytes, lane.node, seconds)

    async def _throttle(self, chunks: list[int]) -> None:
        rate = self.settings.rate
        if not rate or not chunks:
            return
        now = time.monotonic()
        if not self._rate_start:
            self._rate_start = now
        self._rate_bytes += self.grid.bytes_of(chunks)
        ahead = self._rate_start + self._rate_bytes / rate - now
        if ahead > 0:
            await asyncio.sleep(ahead)

    def _fail(self, node: str, exc: BaseException) -> None:
        message = getattr(exc, "message", str(exc))
        log.info("pull of %s v%d: dropping source %s: %s", self.manifest.name, self.manifest.version, node, message)
        self._error = f"{node}: {message}"
        self.plan.fail(node)
        self._drop_lane(node)

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
            peer = Peer(node, record.control[len("tcp:") :], self.cluster.peers.token, timeout=self.settings.wait + 30)
            lane = self.lanes[node] = Lane(node, peer)
        async with lane.lock:
            if lane.pin is not None:
                return lane
            result, _ = await lane.peer.call(
                "stream_open",
                name=self.manifest.name,
                version=self.manifest.version,
                node=self.me,
                chunk=self.grid.size,
            )
            if not isinstance(result, dict) or result.get("count") != self.grid.count:
                raise ProtocolError(f"node {node} described its stream of {self.manifest.name} wrongly")
            if int(result.get("nbytes") or 0) < self.manifest.nbytes:
                raise ProtocolError(f"node {node} holds a slab smaller than {self.manifest.name}")
            lane.pin = int(result["pin"])
            lane.session = str(result.get("session") or "")
            lane.address = int(result.get("address") or 0)
            lane.complete = bool(result.get("complete"))
            lane.device = str(result.get("device") or "")
            transport = self.cluster.store.transport
            lane.push = not (transport is not None and lane.session and lane.address)
            if lane.push:
                assert self.partial is not None
                ok, why = pairmod.available(self.partial.slab.device, lane.device)
                if not (self.settings.pairs and ok and self.cluster.pairs is not None):
                    raise Unavailable(f"no Transfer Engine path from {node}, and no pair group ({why or 'off'})")
            have = result.get("have")
            self.plan.offer(
                node,
                complete=lane.complete,
                have=None if have is None else chunkmap.unpack(have, self.grid.count),
                busy=int(result.get("busy") or 0),
            )
        return lane

    def _joiner(self, lane: Lane) -> Any:
        async def join(**args: Any) -> None:
            async with lane.lock:
                await lane.peer.call("stream_pair", node=self.me, reply_timeout=self.cluster.pairs_timeout, **args)

        return join

    async def _release(self, lane: Lane) -> None:
        try:
            if lane.pin is not None and lane.peer.connected:
                async with lane.lock:
                    await asyncio.wait_for(lane.peer.call("release", pin=lane.pin), 5.0)
        except (TensordError, TimeoutError, OSError):
            pass
        finally:
            await lane.peer.close()

    # -- the registry -------------------------------------------------------------------------
    async def _nodes(self) -> None:
        with contextlib.suppress(Unavailable):
            self.records = {r.node: r for r in await self.cluster.store.registry.nodes()}

    async def _discover(self) -> None:
        """Holders from the registry (complete replicas, partial ones of the same chunk size)
        and the other targets of a fan-out, offered to the plan."""
        registry = self.cluster.store.registry
        name, version = self.manifest.name, self.manifest.version
        await self._nodes()
        try:
            replicas = await registry.replicas(name, version)
            partials: list[PartialReplica] = await registry.partials(name, version)
        except Unavailable as exc:
            log.info("pull of %s v%d: registry unreachable (%s)", name, version, exc.message)
            return
        host = self.cluster.host
        for r in replicas:
            record = self.records.get(r.node)
            if record is not None and r.node != self.me:
                self.plan.offer(r.node, complete=True, same_host=record.host == host)
        for p in partials:
            record = self.records.get(p.node)
            if record is None or p.node == self.me or p.chunk != self.grid.size or p.count != self.grid.count:
                continue
            try:
                have = chunkmap.unpack(p.have, p.count)
            except ProtocolError:
                continue
            self.plan.offer(p.node, complete=False, have=have, same_host=record.host == host)
        for node in self.co_pullers:
            record = self.records.get(node)
            if record is not None:
                self.plan.offer(node, complete=False, same_host=record.host == host)

    async def _advertise(self, *, force: bool = False) -> None:
        partial = self.partial
        assert partial is not None
        held = int(partial.held.sum())
        if held == self._advertised and not force:
            return
        record = PartialReplica(
            *partial.key, self.me, partial.slab.device, self.grid.size, self.grid.count, chunkmap.pack(partial.held)
        )
        try:
            await self.cluster.store.registry.put_partial(record)
            self._advertised = held
        except Unavailable as exc:
            log.info("cannot advertise the partial replica of %s v%d: %s", *partial.key, exc.message)

    # -- checking -----------------------------------------------------------------------------
    def _check(self) -> np.ndarray:
        """The chunks holding a tensor whose fingerprint is wrong (empty: all good)."""
        assert self.partial is not None
        m = self.manifest
        view = own_view(self.partial.slab)
        try:
            actual = view.fingerprints(m.offsets, m.sizes)
        finally:
            view.close()
        if m.fingerprints is None:
            return np.zeros(0, dtype=np.int64)
        bad = np.flatnonzero(actual != m.fingerprints)
        if not len(bad):
            return np.zeros(0, dtype=np.int64)
        return self.grid.covering(m.offsets[bad], m.sizes[bad])

    def _phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    def status(self) -> dict[str, Any]:
        return {
            "name": self.manifest.name,
            "version": self.manifest.version,
            "chunks": self.grid.count,
            "chunk": self.grid.size,
            "held": self.plan.held,
            "bytes": self.bytes,
            "seconds": time.monotonic() - self.started,
            "sources": dict(self.sourced),
            "phases": {k: round(v, 4) for k, v in self.phases.items()},
        }
