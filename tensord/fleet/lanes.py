"""A pull's view of the holders: finding them (and its co-pullers) in the registry, one `Lane`
per holder (its own connection and stream pin), the arguments of a chunk request, and the
checked reading of its answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensord.fleet import chunks as chunkmap
from tensord.fleet.chunks import Grid
from tensord.fleet.policy import Request
from tensord.peers import Peer
from tensord.registry.base import NodeRecord, PartialReplica, Registry
from tensord_contract.errors import ProtocolError, TensordError, TransferError, Unavailable
from tensord_contract.manifest import Manifest

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
        result, _ = await self.peer.call(
            "stream_open", name=manifest.name, version=manifest.version, node=me, chunk=grid.size
        )
        if not isinstance(result, dict) or result.get("count") != grid.count:
            raise ProtocolError(f"node {self.node} described its stream of {manifest.name} wrongly")
        if int(result.get("nbytes") or 0) < manifest.nbytes:
            raise ProtocolError(f"node {self.node} holds a slab smaller than {manifest.name}")
        self.pin = int(result["pin"])
        self.session = str(result.get("session") or "")
        self.address = int(result.get("address") or 0)
        self.complete = bool(result.get("complete"))
        self.device = str(result.get("device") or "")
        have = result.get("have")
        return None if have is None else chunkmap.unpack(have, grid.count), int(result.get("busy") or 0)

    async def ask(self, **args: Any) -> Any:
        """One chunk request (`stream_chunks`); its answer."""
        async with self.lock:
            result, _ = await self.peer.call("stream_chunks", **args)
        return result

    async def alive(self) -> bool:
        """Whether the holder still answers on this lane."""
        try:
            async with self.lock:
                await self.peer.call("stream_chunks", pin=self.pin, reply_timeout=5.0)
        except TensordError:
            return False
        return True

    def joiner(self, me: str, timeout: float) -> Any:
        """What a pair group calls to have the holder join it."""

        async def join(**args: Any) -> None:
            async with self.lock:
                await self.peer.call("stream_pair", node=me, reply_timeout=timeout, **args)

        return join

    async def release(self) -> None:
        """Release the stream pin (if the connection still stands) and close the connection."""
        try:
            if self.pin is not None and self.peer.connected:
                async with self.lock:
                    await asyncio.wait_for(self.peer.call("release", pin=self.pin), 5.0)
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


def request_args(pin: int | None, wait: float, req: Request, start: int) -> dict[str, Any]:
    """The arguments of a `stream_chunks` request for `req`."""
    args: dict[str, Any] = {"pin": pin, "wait": wait}
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
        args["start"] = start
    return args


@dataclass
class Answer:
    """A holder's answer to a chunk request, checked."""

    granted: list[int]
    redirect: dict[int, str]
    have: np.ndarray | None
    busy: int
    complete: bool
    gone: bool
    full: bool


def read_answer(node: str, result: Any, count: int) -> Answer:
    if not isinstance(result, dict):
        raise ProtocolError(f"node {node} answered a chunk request with {type(result).__name__}")
    granted = chunkmap.chunk_list(result.get("granted"), count, "granted")
    redirect: dict[int, str] = {}
    for pair in result.get("redirect") or []:
        if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or not isinstance(pair[1], str):
            raise ProtocolError(f"node {node} sent a malformed redirect")
        if 0 <= pair[0] < count:
            redirect[pair[0]] = pair[1]
    have = result.get("have")
    return Answer(
        granted,
        redirect,
        None if have is None else chunkmap.unpack(have, count),
        int(result.get("busy") or 0),
        bool(result.get("complete")),
        bool(result.get("gone")),
        bool(result.get("full")),
    )


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
            have = chunkmap.unpack(p.have, p.count)
        except ProtocolError:
            continue
        offers.append(Offer(p.node, False, have, same_host=record.host == host))
    for node in co_pullers:
        record = records.get(node)
        if record is not None:
            offers.append(Offer(node, False, same_host=record.host == host))
    return offers
