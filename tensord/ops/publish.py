"""Publishing without a copy: a process on this node advertises tensors in its own memory (GPU
or host) as a version (`publish`) and withdraws it (`unpublish`, which waits for readers, here
and on other nodes, to let go).
The replica lives as long as the publishing connection (`tensord.published_slabs`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import Any

from tensord.ops.base import Ops, unless_gone
from tensord.publications import withdraw
from tensord.published_slabs import PublishedSlab
from tensord.rpc import Session
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.manifest import Manifest
from tensord_contract.messages import UnpublishReply, UnpublishRequest
from tensord_contract.table_messages import PublishReply, PublishRequest, PutBeginReply

DRAIN_SECONDS = 60.0  # how long unpublish waits for readers by default


class PublishOps(Ops):
    async def op_publish(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        if not session.local:
            raise InvalidArgument("publish hands the daemon a process's memory: connect over this node's Unix socket")
        req = await self._decode(PublishRequest, request, self.store.known_table(request.get("name")))
        if req.table is None:  # named by a digest that is not the known table's: ask for it
            return PutBeginReply.wanting_table(), []
        offsets, nbytes = req.table.layout()
        manifest = Manifest(
            req.name,
            0,
            req.table,
            offsets,
            nbytes,
            created=time.time(),
            origin=req.origin or f"published by {session.peer}",
        )
        exposed = None if req.exposed is None else dataclasses.replace(req.exposed, node=self.node)
        held = await self.store.hold_new(
            manifest, PublishedSlab(req.ipc, exposed, session.peer), req.fingerprints, req.fp
        )
        session.published[held.key] = held
        return PublishReply(held.manifest.version).to_wire(), []

    async def op_unpublish(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = UnpublishRequest.from_wire(request, InvalidArgument)
        name, version, timeout = req.name, req.version, req.timeout
        held = session.published.pop((name, version), None)
        if held is None:
            raise NotFound(f"{name} v{version} was not published by this connection", name=name, version=version)
        await withdraw(self.store, self.context, held)
        try:
            if held.pins > 0:
                held.drained = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await unless_gone(session, held.drained.wait(), DRAIN_SECONDS if timeout is None else timeout)
        finally:  # also when the publisher left meanwhile: the readers still pinned are told
            held.revoked = held.pins > 0
        return UnpublishReply(not held.revoked, held.pins).to_wire(), []

    async def withdraw_published(self, session: Session) -> None:
        """The publisher's connection closed: its memory may be gone or reused at any moment."""
        for held in session.published.values():
            await withdraw(self.store, self.context, held)
            held.revoked = held.pins > 0
        session.published.clear()
