"""Copies between nodes: replicate (one node pulls, or several at once as a fan-out) and the
holder's side of a streaming pull (`tensord.fleet`): stream_open, stream_chunks, stream_pair."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from typing import Any

from tensord.fleet.policy import Request
from tensord.fleet.serve import StreamPin
from tensord.ops.base import Ops
from tensord.rpc import Session, brief
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument, NotFound, ProtocolError, TensordError, TransferError, Unavailable
from tensord_contract.messages import FanOutReply, ReplicateReply, ReplicateRequest
from tensord_contract.streams import (
    StreamChunksRequest,
    StreamOpenRequest,
    StreamPairReply,
    StreamPairRequest,
)

log = logging.getLogger(__name__)

_REPLICATE_TIMEOUT = 24 * 3600.0  # a replicate call returns when the copy is complete
_LEASE_POLL = 1.0  # how often a fan-out checks that the targets it waits on still hold a lease
#: stream pins one connection may hold (a pull opens one per holder, each on its own connection)
MAX_STREAM_PINS = 16


class FleetOps(Ops):
    async def op_replicate(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Make one node (`to`: a node id, default this one) or several (`to`: a list of node
        ids, or "all" for every live node) pull a copy. Several pull at once as one fan-out: the
        reply comes when every one of them holds a complete, checked replica."""
        req = ReplicateRequest.from_wire(request, InvalidArgument)
        if self.cluster is None:
            raise Unavailable("replication needs a cluster (etcd) and a Transfer Engine")
        name, device, to = req.name, req.device, req.to
        version = await self.store.resolve_version(name, req.version)
        if req.fan_out:
            return await self._fan_out(dataclasses.replace(req, version=version)), []
        if isinstance(to, str) and to != self.node:
            record = {n.node: n for n in await self.registry.nodes()}.get(to)
            if record is None:
                raise NotFound(f"no live node {to!r}")
            assert self.peers is not None  # built with the cluster
            forwarded = ReplicateRequest(name, version, device, rate=req.rate, chunk=req.chunk)
            call = self.peers.get(to, record.control).call(
                "replicate", reply_timeout=_REPLICATE_TIMEOUT, **forwarded.to_wire()
            )  # fmt: skip
            result, _ = await _while_live(to, asyncio.ensure_future(call), _Live(self.registry))
            return ReplicateReply.from_wire(result, ProtocolError).to_wire(), []
        place = req.place
        held = await self.cluster.replicate(name, version, device, rate=req.rate, chunk=req.chunk, **place)
        out = ReplicateReply(self.node, name, version, held.slab.device)
        done = self.cluster.finished_pull(name, version)
        if done is not None and place:
            out = dataclasses.replace(out, **{k: done[k] for k in ("seconds", "sources", "phases", "chunk")})
        return out.to_wire(), []

    async def _fan_out(self, req: ReplicateRequest) -> dict[str, Any]:
        """`req` to several nodes at once (its version resolved): each pulls as a target."""
        assert self.peers is not None  # built with the cluster
        name, version = req.name, req.version
        assert version is not None
        records = {n.node: n for n in await self.registry.nodes()}
        if req.to == "all":
            targets = sorted(records)
        else:
            assert isinstance(req.to, tuple)
            targets = list(dict.fromkeys(req.to))
            missing = [t for t in targets if t not in records]
            if missing:
                raise NotFound(f"no live node {missing[0]!r}")
        holding = {r.node for r in await self.registry.replicas(name, version)}
        pulling = [t for t in targets if t not in holding]
        t0 = time.monotonic()
        peers = self.peers

        async def one(i: int, node: str) -> ReplicateReply | TensordError:
            target = ReplicateRequest(name, version, req.device, rate=req.rate, chunk=req.chunk)
            target = dataclasses.replace(target, index=i, of=len(pulling), peers=tuple(pulling))
            try:
                if node == self.node:
                    result, _ = await self.op_replicate(session_of_self, {"op": "replicate", **target.to_wire()})
                else:
                    peer = peers.get(node, records[node].control)
                    call = peer.call("replicate", reply_timeout=_REPLICATE_TIMEOUT, **target.to_wire())
                    result, _ = await _while_live(node, asyncio.ensure_future(call), live)
                return ReplicateReply.from_wire(result, ProtocolError)
            except TensordError as exc:
                return exc

        session_of_self = Session(0, "fan-out")
        live = _Live(self.registry)
        results = dict(zip(pulling, await asyncio.gather(*(one(i, n) for i, n in enumerate(pulling))), strict=True))
        failed = {n: r.message for n, r in results.items() if isinstance(r, TensordError)}
        pulled = {n: r for n, r in results.items() if isinstance(r, ReplicateReply)}
        held = tuple(t for t in targets if t in holding)
        out = FanOutReply(name, version, pulled, time.monotonic() - t0, held)
        if failed:
            raise TransferError(
                f"{len(failed)} of {len(targets)} nodes could not replicate {name} v{version}: "
                + "; ".join(f"{n}: {e}" for n, e in sorted(failed.items())),
                name=name,
                version=version,
                failed=sorted(failed),
                done=sorted(set(targets) - set(failed)),
            )
        log.info("fan-out of %s v%d to %d nodes in %.2f s", name, version, len(targets), out.seconds)
        return out.to_wire()

    # -- streaming pulls: the holder's side (tensord.fleet) -----------------------------------
    async def op_stream_open(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = StreamOpenRequest.from_wire(request, InvalidArgument)
        if self.serving is None:
            raise Unavailable("streaming needs a cluster")
        streams = [p for p in session.pins.values() if isinstance(p, StreamPin)]
        if len(streams) >= MAX_STREAM_PINS:
            raise InvalidArgument(f"a connection holds at most {MAX_STREAM_PINS} stream pins: release one first")
        if any(p.requester != req.node for p in streams):
            raise InvalidArgument("a connection streams for one node: open another connection for another")
        reply, pin = self.serving.open(req.name, req.version, req.node, req.chunk)
        pid = next(self._pins)
        session.pins[pid] = pin
        return dataclasses.replace(reply, pin=pid).to_wire(), []

    async def op_stream_chunks(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        served = self.serving
        if served is None:
            raise Unavailable("streaming needs a cluster")

        def count_of(pid: object) -> int:
            pin = session.pins.get(pid) if is_int(pid) else None
            if not isinstance(pin, StreamPin):
                raise InvalidArgument(f"pin {brief(pid)} is no stream pin of this connection")
            return served.count(pin)

        req = StreamChunksRequest.from_wire(request, InvalidArgument, count_of)
        pin = session.pins[req.pin]
        assert isinstance(pin, StreamPin)
        if req.push and self.pairs is None:
            raise Unavailable(f"node {self.node} has pair groups off (fleet.pair_groups)")
        asked = Request(pin.requester, req.chunks, req.force, req.want, req.limit, req.done, req.declined)
        wait = 0.0 if req.wait is None else req.wait
        reply = await served.chunks(pin, asked, start=req.start, wait=wait, push=req.device if req.push else None)
        return reply.to_wire(), []

    async def op_stream_pair(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Join the pair group a puller set up to receive from this node (NCCL or gloo)."""
        pairs = self.pairs
        if pairs is None:
            raise Unavailable(f"node {self.node} has pair groups off (fleet.pair_groups)")
        req = StreamPairRequest.from_wire(request, InvalidArgument)
        record = {n.node: n for n in await self.registry.nodes()}.get(req.node)
        if record is None or record.control.rpartition(":")[0] != f"tcp:{req.host}":
            # only join a rendezvous at the address the named node advertises
            raise InvalidArgument(f"{req.host} is not where live node {req.node!r} listens")
        seconds = await asyncio.to_thread(pairs.join, req)
        return StreamPairReply(seconds).to_wire(), []


class _Live:
    """The live nodes, read from the registry at most once per `_LEASE_POLL` however many ask."""

    def __init__(self, registry: Any) -> None:
        self.registry, self.at, self.nodes = registry, -math.inf, set[str]()
        self.lock = asyncio.Lock()

    async def get(self) -> set[str] | None:
        """The live nodes, or None while the registry cannot be reached."""
        async with self.lock:
            if time.monotonic() - self.at >= _LEASE_POLL:
                try:
                    self.nodes = {n.node for n in await self.registry.nodes()}
                except Unavailable:
                    return None
                self.at = time.monotonic()
            return self.nodes


async def _while_live(node: str, call: asyncio.Future[Any], live: _Live) -> Any:
    """`call`'s result, unless `node` loses its lease first (it died, or froze: a stopped
    process answers nothing, but its connection stays open): then Unavailable, naming it."""
    missed = 0
    try:
        while True:
            done, _ = await asyncio.wait({call}, timeout=_LEASE_POLL)
            if done:
                return call.result()
            nodes = await live.get()
            if nodes is None:
                continue  # no registry, no verdict: keep waiting
            missed = 0 if node in nodes else missed + 1
            if missed >= 2:
                raise Unavailable(f"node {node} lost its lease while it replicated (dead or frozen)", node=node)
    finally:
        if not call.done():
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
