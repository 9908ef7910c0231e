"""Connections from this daemon to other daemons' TCP listeners (the gateway's side).

A remote pin lives in the session this connection holds on the peer. If the connection breaks
(the peer died or restarted), every pin taken through it is gone: `epoch` counts connections,
so a pin taken in an earlier epoch is known to be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any

from tensord_contract import wire
from tensord_contract.errors import TensordError, Unavailable, from_wire

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemotePin:
    peer: Peer
    pin: int
    epoch: int
    node: str


class Peer:
    def __init__(self, node: str, address: str, token: str, *, timeout: float = 30.0) -> None:
        self.node, self.address, self._token, self.timeout = node, address, token, timeout
        self.epoch = 0
        self.busy = 0  # reads in flight through this gateway: a measure of load
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    async def call(self, op: str, /, *, reply_timeout: float | None = None, **args: Any) -> tuple[Any, int]:
        """One request; returns (result, epoch of the connection that carried it). The reply
        may take `reply_timeout` seconds (default: the peer's `timeout`)."""
        async with self._lock:
            try:
                if self._streams is None:
                    await self._connect()
                assert self._streams is not None
                reader, writer = self._streams
                request_id = next(self._ids)
                writer.write(wire.encode({"id": request_id, "op": op, "args": args}))
                await writer.drain()
                wait = self.timeout if reply_timeout is None else reply_timeout
                header = await asyncio.wait_for(reader.readexactly(wire.HEADER.size), wait)
                reply = wire.decode(await reader.readexactly(wire.frame_length(header)))
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
                await self._drop()
                raise Unavailable(f"node {self.node} at {self.address} is unreachable: {exc}", node=self.node) from exc
            except asyncio.CancelledError:
                await self._drop()  # a reply may still come: this stream cannot be trusted
                raise
            if reply.get("id") != request_id:
                await self._drop()
                raise Unavailable(f"node {self.node} answered out of turn", node=self.node)
            if not reply.get("ok"):
                raise from_wire(reply.get("error"))
            return reply.get("result"), self.epoch

    @property
    def connected(self) -> bool:
        return self._streams is not None

    async def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), self.timeout)
        self._streams = (reader, writer)
        self.epoch += 1
        hello: dict[str, Any] = {"protocol": wire.PROTOCOL_VERSION, "client": "tensord-peer"}
        if self._token:
            hello["token"] = self._token
        writer.write(wire.encode({"id": 0, "op": "hello", "args": hello}))
        await writer.drain()
        header = await asyncio.wait_for(reader.readexactly(wire.HEADER.size), self.timeout)
        reply = wire.decode(await reader.readexactly(wire.frame_length(header)))
        if not reply.get("ok"):
            await self._drop()
            raise from_wire(reply.get("error"))
        log.info("connected to node %s at %s", self.node, self.address)

    async def _drop(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def pin(self, name: str, version: int, have: Any = None) -> tuple[dict[str, Any], RemotePin]:
        """Open a version on the peer: its reply, and the pin that keeps it alive. `have`: the
        (version, generation) pairs whose manifests the reader holds (they are left out)."""
        args: dict[str, Any] = {"name": name, "version": version}
        if have:
            args["have"] = have
        result, epoch = await self.call("open", **args)
        return result, RemotePin(self, int(result["pin"]), epoch, self.node)

    async def release(self, pin: RemotePin) -> bool:
        """Give a remote pin back; True if it held all along (same connection, still known)."""
        if pin.epoch != self.epoch or self._streams is None:
            return False
        try:
            result, epoch = await self.call("release", pin=pin.pin)
        except TensordError:
            return False
        return epoch == pin.epoch and bool(result.get("released"))

    async def close(self) -> None:
        async with self._lock:
            await self._drop()


class Peers:
    """One Peer per node, created on first use."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._peers: dict[str, Peer] = {}

    def get(self, node: str, control: str) -> Peer:
        if not control.startswith("tcp:"):
            raise Unavailable(f"node {node} has no TCP listener (daemon.listen is not set there)", node=node)
        address = control[len("tcp:") :]
        peer = self._peers.get(node)
        if peer is None or peer.address != address:
            peer = self._peers[node] = Peer(node, address, self.token)
        return peer

    async def close(self) -> None:
        for peer in self._peers.values():
            await peer.close()
        self._peers.clear()
