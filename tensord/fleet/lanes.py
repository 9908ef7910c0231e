"""A pull's view of the holders: finding them (and its co-pullers) in the registry, one `Lane`
per holder (its own connection and stream pin), a chunk request, and the checked reading of its
answer (`tensord_contract.streams`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensord.fleet.chunks import Grid
from tensord.fleet.policy import Request
from tensord.peers import Peer
from tensord.registry.base import NodeRecord, PartialReplica, Registry
from tensord_contract.errors import ProtocolError, TensordError, TransferError, Unavailable
from tensord_contract.manifest import Manifest
from tensord_contract.messages import ReleaseRequest
from tensord_contract.streams import (
    StreamChunksReply,
    StreamChunksRequest,
    StreamOpenReply,
    StreamOpenRequest,
    StreamPairReply,
    StreamPairRequest,
    unpack_bitmap,
)

log = logging.getLogger(__name__)


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

    @classmethod
    def connect(cls, record: NodeRecord, token: str, timeout: float) -> Lane:
        return cls(record.node, Peer(record.node, record.control[len("tcp:") :], token, timeout=timeout))

    async def open(self, manifest: Manifest, grid: Grid, me: str) -> tuple[np.ndarray | None, int]:
        """Pin the holder's replica (`stream_open`; the caller holds the lock): what chunks it
        has (None: all) and how busy it is."""
        request = StreamOpenRequest(manifest.name, manifest.version, me, grid.size)
        result, _ = await self.peer.call("stream_open", **request.to_wire())
        try:
            reply = StreamOpenReply.from_wire(result, ProtocolError)
        except ProtocolError as exc:
            raise ProtocolError(f"node {self.node}: {exc.message}") from None
        if reply.count != grid.count:
            raise ProtocolError(f"node {self.node} described its stream of {manifest.name} wrongly")
        if reply.nbytes < manifest.nbytes:
            raise ProtocolError(f"node {self.node} holds a slab smaller than {manifest.name}")
        self.pin, self.session, self.address = reply.pin, reply.session, reply.address
        self.complete, self.device = reply.complete, reply.device
        return reply.have, reply.busy

    async def ask(self, request: StreamChunksRequest, count: int) -> StreamChunksReply:
        """One chunk request (`stream_chunks`) about a stream of `count` chunks; its answer.
        (The caller holds the lock.)"""
        result, _ = await self.peer.call("stream_chunks", **request.to_wire())
        return read_answer(self.node, result, count)

    async def alive(self) -> bool:
        """Whether the holder still answers on this lane."""
        assert self.pin is not None
        try:
            async with self.lock:
                await self.peer.call("stream_chunks", reply_timeout=5.0, **StreamChunksRequest(self.pin).to_wire())
        except TensordError:
            return False
        return True

    def joiner(self, timeout: float) -> Callable[[StreamPairRequest], Awaitable[None]]:
        """What a pair group calls to have the holder join it."""

        async def join(request: StreamPairRequest) -> None:
            async with self.lock:
                result, _ = await self.peer.call("stream_pair", reply_timeout=timeout, **request.to_wire())
            StreamPairReply.from_wire(result, ProtocolError)

        return join

    async def release(self) -> None:
        """Release the stream pin (if the connection still stands) and close the connection."""
        try:
            if self.pin is not None and self.peer.connected:
                async with self.lock:
                    await asyncio.wait_for(self.peer.call("release", **ReleaseRequest(self.pin).to_wire()), 5.0)
        except (TensordError, TimeoutError, OSError):
            pass
        finally:
            await self.peer.close()


class Reads:
    """Transfer Engine reads into a pull's slab that are still running. A read cannot be called
    off: one from a holder that stopped answering runs until the engine gives up on it
    (`MC_TRANSFER_TIMEOUT`), so its chunks are asked elsewhere meanwhile, and the pull waits
    for every read to end before it checks or gives up the slab (no late bytes go unchecked,
    none land in freed memory)."""

    def __init__(self) -> None:
        self.running: set[asyncio.Future[None]] = set()

    async def read(self, transport: Any, session: str, batch: Any, bound: float | None) -> None:
        """Read `batch`; TransferError when it takes over `bound` seconds (None: the engine's)."""
        read = asyncio.ensure_future(asyncio.to_thread(transport.read, session, batch))
        self.running.add(read)
        read.add_done_callback(_settled(self.running))
        try:
            await asyncio.wait_for(asyncio.shield(read), bound)
        except TimeoutError:
            raise TransferError(f"a read of {batch.nbytes} bytes took over {bound:.1f} s") from None

    async def settle(self, timeout: float) -> int:
        """Wait for the reads still running (up to `timeout`); how many still run."""
        if self.running:
            await asyncio.wait(list(self.running), timeout=timeout)
        return len(self.running)


def _settled(running: set[asyncio.Future[None]]) -> Any:
    def done(read: asyncio.Future[None]) -> None:
        running.discard(read)
        if not read.cancelled():
            read.exception()  # retrieved: an abandoned read's failure was already handled

    return done


def chunks_request(pin: int, wait: float, req: Request, start: int, push: str = "") -> StreamChunksRequest:
    """The `stream_chunks` request for `req` (`push`: the device of this pull's slab, to have
    the holder send over a pair group)."""
    return StreamChunksRequest(
        pin,
        req.chunks,
        req.force if req.chunks else [],
        req.want,
        req.limit,
        start,
        req.done,
        req.declined,
        wait,
        bool(push),
        push,
    )


def read_answer(node: str, result: Any, count: int) -> StreamChunksReply:
    """A holder's answer to a chunk request, checked; ProtocolError naming the node."""
    try:
        return StreamChunksReply.from_wire(result, ProtocolError, count)
    except ProtocolError as exc:
        raise ProtocolError(f"node {node}: {exc.message}") from None


@dataclass
class Offer:
    """A node a pull may stream from."""

    node: str
    complete: bool
    have: np.ndarray | None = None
    same_host: bool = False


async def find_holders(
    registry: Registry,
    records: dict[str, NodeRecord],
    manifest: Manifest,
    grid: Grid,
    me: str,
    host: str,
    co_pullers: Iterable[str],
) -> list[Offer]:
    """Live holders from the registry (complete replicas, partial ones of the same chunk size)
    and the other targets of a fan-out; none while the registry is unreachable."""
    name, version = manifest.name, manifest.version
    try:
        replicas = await registry.replicas(name, version)
        partials: list[PartialReplica] = await registry.partials(name, version)
    except Unavailable as exc:
        log.info("pull of %s v%d: registry unreachable (%s)", name, version, exc.message)
        return []
    offers = []
    for r in replicas:
        record = records.get(r.node)
        if record is not None and r.node != me:
            offers.append(Offer(r.node, True, same_host=record.host == host))
    for p in partials:
        record = records.get(p.node)
        if record is None or p.node == me or p.chunk != grid.size or p.count != grid.count:
            continue
        try:
            have = unpack_bitmap(p.have, p.count)
        except ProtocolError:
            continue
        offers.append(Offer(p.node, False, have, same_host=record.host == host))
    for node in co_pullers:
        record = records.get(node)
        if record is not None:
            offers.append(Offer(node, False, same_host=record.host == host))
    return offers
