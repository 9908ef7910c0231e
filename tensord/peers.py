"""Connections from this daemon to other daemons' TCP listeners (the gateway's side).

A remote pin lives in the session this connection holds on the peer. If the connection breaks
(the peer died or restarted), every pin taken through it is gone: `epoch` counts connections,
so a pin taken in an earlier epoch is known to be lost.

The asyncio driver over `tensord_contract.control`: ids, frames, hello and reply mapping are
the core's; this module connects, reads and writes streams, and turns failures into Unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from tensord_contract import control, wire
from tensord_contract.errors import ProtocolError, TensordError, Unavailable
from tensord_contract.messages import OpenReply, OpenRequest, ReleaseReply, ReleaseRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemotePin:
    """A pin on another node (`tensord.rpc.Pin`), taken by this gateway for a reader here."""

    peer: Peer
    pin: int
    epoch: int
    node: str

    async def release(self, *, clean: bool = True) -> bool:
        """Give it back on the holder; whether it held all along (`Peer.release`). The read it
        served no longer counts towards the peer's load."""
        self.peer.read_ended()
        return await self.peer.release(self)


class Peer:
    def __init__(self, node: str, address: str, token: str, *, timeout: float = 30.0) -> None:
        self.node, self.address, self._token, self.timeout = node, address, token, timeout
        self.epoch = 0
        self.busy = 0  # reads in flight through this gateway (`reading`, `read_ended`): a measure of load
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()
        self._core = control.ClientProtocol()

    def reading(self) -> None:
        """A reader here was handed a pin on this peer."""
        self.busy += 1

    def read_ended(self) -> None:
        self.busy = max(0, self.busy - 1)

    async def call(self, op: str, /, *, reply_timeout: float | None = None, **args: Any) -> tuple[Any, int]:
        """One request; returns (result, epoch of the connection that carried it). The reply
        may take `reply_timeout` seconds (default: the peer's `timeout`)."""
        async with self._lock:
            try:
                if self._streams is None:
                    await self._connect()
                request_id, frame = self._core.request(op, args)
                wait = self.timeout if reply_timeout is None else reply_timeout
                reply = await self._exchange(frame, wait)
            except (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError) as exc:
                await self._drop()
                raise Unavailable(f"node {self.node} at {self.address} is unreachable: {exc}", node=self.node) from exc
            except asyncio.CancelledError:
                await self._drop()  # a reply may still come: this stream cannot be trusted
                raise
            try:
                self._core.check(reply, request_id, op)
            except ProtocolError:
                await self._drop()
                raise Unavailable(f"node {self.node} answered out of turn", node=self.node) from None
            return self._core.result(reply), self.epoch

    @property
    def connected(self) -> bool:
        return self._streams is not None

    async def _exchange(self, frame: bytes, wait: float) -> dict[str, Any]:
        """Send one frame; the next reply, whose first bytes must come within `wait` seconds."""
        assert self._streams is not None
        reader, writer = self._streams
        writer.write(frame)
        await writer.drain()
        frames = control.FrameReader()
        frames.feed(await asyncio.wait_for(reader.readexactly(frames.wanted), wait))
        while (body := frames.next()) is None:
            frames.feed(await reader.readexactly(frames.wanted))
        return wire.decode(body)

    async def _connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), self.timeout)
        self._streams = (reader, writer)
        self.epoch += 1
        _, frame = self._core.hello("tensord-peer", self._token)
        reply = await self._exchange(frame, self.timeout)
        try:
            self._core.result(reply)
        except TensordError:  # a wrong token or protocol: the stream is of no use
            await self._drop()
            raise
        log.info("connected to node %s at %s", self.node, self.address)

    async def _drop(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def pin(
        self, name: str, version: int, have: frozenset[tuple[int, int]] = frozenset()
    ) -> tuple[OpenReply, RemotePin]:
        """Open a version on the peer: its reply, and the pin that keeps it alive. `have`: the
        (version, generation) pairs whose manifests the reader holds (they are left out)."""
        result, epoch = await self.call("open", **OpenRequest(name, version, have=have).to_wire())
        reply = OpenReply.from_wire(result, ProtocolError)
        return reply, RemotePin(self, reply.pin, epoch, self.node)

    async def release(self, pin: RemotePin) -> bool:
        """Give a remote pin back; True if it held all along (same connection, still known, not
        revoked)."""
        if pin.epoch != self.epoch or self._streams is None:
            return False
        try:
            result, epoch = await self.call("release", **ReleaseRequest(pin.pin).to_wire())
            reply = ReleaseReply.from_wire(result, ProtocolError)
        except TensordError:
            return False
        # not intact: a publication withdrawn under the pin (its bytes may have changed)
        return epoch == pin.epoch and reply.released and reply.intact

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
