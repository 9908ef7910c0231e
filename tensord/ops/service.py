"""The control plane's dispatcher: one `op_<name>` method per op, from the op groups; what a
session took is given back when it ends."""

from __future__ import annotations

from typing import Any

from tensord import __version__
from tensord.ops.catalogue import CatalogueOps
from tensord.ops.data import DataOps
from tensord.ops.files import FileOps
from tensord.ops.fleet import FleetOps
from tensord.ops.publish import PublishOps
from tensord.rpc import Session
from tensord_contract import wire
from tensord_contract.errors import InvalidArgument, ProtocolError
from tensord_contract.messages import OpenReply
from tensord_contract.node_messages import HelloReply, HelloRequest
from tensord_contract.table_messages import PutBeginReply


class Service(CatalogueOps, DataOps, FileOps, FleetOps, PublishOps):
    async def handle(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        if not self.ready.is_set() and request["op"] != "hello":
            await self.ready.wait()
        method = getattr(self, "op_" + request["op"])
        return await method(session, request)

    async def unsent(self, session: Session, op: str, result: Any) -> None:
        """A request succeeded but its reply could not be sent (too large for a frame): give
        back what it took, so nothing stays held for a client that never learnt of it."""
        if op == "put_begin":
            rid = PutBeginReply.reservation_of(result)
            if rid is not None:
                session.reservations.discard(rid)
                self.store.abort(rid)
        elif op == "open":
            pin = session.pins.pop(OpenReply.from_wire(result, InvalidArgument).pin, None)
            if pin is not None:
                await pin.release(clean=True)

    async def session_closed(self, session: Session) -> None:
        await self.withdraw_published(session)
        for pin in session.pins.values():
            await pin.release(clean=False)
        session.pins.clear()
        for rid in session.reservations:
            self.store.abort(rid)
        session.reservations.clear()
        for task, _, _ in self._watches.pop(session.id, {}).values():
            task.cancel()

    async def op_hello(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = HelloRequest.from_wire(request, InvalidArgument)
        if req.protocol != wire.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol {req.protocol!r} unsupported; this daemon speaks {wire.PROTOCOL_VERSION}")
        session.hello = True
        if req.client is not None:
            session.peer = f"{req.client[:64]} ({session.peer})"
        transport = self.context.transport
        described = transport.describe() if transport is not None else None
        # cluster: other nodes may read what is published here
        return HelloReply(
            wire.PROTOCOL_VERSION, self.node, __version__, described, self.cluster is not None
        ).to_wire(), []
