"""Reading and writing versions: open (pin a version for a reader, here or on another node),
release, and a put's three steps (reserve a slab, commit it as a version, or abort)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tensord.ops.base import Ops
from tensord.pins import MountPin, ReadPin
from tensord.published_slabs import PublishedSlab
from tensord.records import Held
from tensord.rpc import Session
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.messages import (
    OpenReply,
    OpenRequest,
    PutAbortReply,
    PutAbortRequest,
    ReleaseReply,
    ReleaseRequest,
)
from tensord_contract.table_messages import PutBeginReply, PutBeginRequest, PutCommitReply, PutCommitRequest


class DataOps(Ops):
    async def op_open(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = OpenRequest.from_wire(request, InvalidArgument)
        name, exclude, cached = req.name, list(req.exclude), req.have
        version = await self.store.resolve_version(name, req.version)
        held = self.store.holds(name, version)
        for _ in range(3):  # brought back, then evicted again before this reader could pin it
            if held is not None or self.restorer is None:
                break
            if await self.restorer.recover(name, version) is None:  # not restored yet, or evicted
                break
            held = self.store.holds(name, version)
        if (held is None or not held.live) and self.cluster is not None and self.pull_through and session.local:
            held = await self.cluster.replicate(name, version, None)
        if held is not None and held.live and self.node not in exclude:
            replica, fds = self.store.descriptor(held, local=session.local)
            if not session.local and self.serving is not None:  # a reader on another node
                self.serving.served_read(held.manifest.nbytes)
            self.store.pin(held)
            self._moved(session, held, "read")
            pin = next(self._pins)
            mount = req.mount and session.local and not isinstance(held.slab, PublishedSlab)  # a mapping, not a copy
            session.pins[pin] = (MountPin if mount else ReadPin)(held, self.store.unpin)
            if (version, held.slab.generation) in cached:
                return OpenReply(pin, version, replica).to_wire(), fds
            same = self._same_table(name, held, cached) if req.table_refs else None
            if same is not None:  # a new version of a layout the reader has: no table (~8 MB at 90k)
                return OpenReply(pin, version, replica, held.manifest.placing_wire, same).to_wire(), fds
            return OpenReply(pin, version, replica, held.manifest.wire).to_wire(), fds
        if self.cluster is None:
            lost = self.restorer.lost(name, version) if self.restorer is not None else None
            message = f"{name} v{version} is not held on node {self.node}"
            if lost is not None:
                assert self.restorer is not None
                message = self.restorer.lost_message(name, version, lost)
            raise NotFound(message, name=name, version=version)
        reply, remote = await self.cluster.pin_remote(name, version, exclude, cached)
        pin = next(self._pins)
        session.pins[pin] = remote
        return dataclasses.replace(reply, pin=pin).to_wire(), []

    def _same_table(self, name: str, held: Held, cached: frozenset[tuple[int, int]]) -> tuple[int, int] | None:
        """A (version, generation) of the reader's `have` held here with `held`'s very table."""
        for version, generation in sorted(cached, reverse=True):
            other = self.store.lookup(name, version)
            if (
                other is not None
                and other.slab.generation == generation
                and other.manifest.table is held.manifest.table
            ):
                return version, generation
        return None

    async def op_release(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = ReleaseRequest.from_wire(request, InvalidArgument)
        held = session.pins.pop(req.pin, None) if req.pin is not None else None
        intact = await held.release(clean=True) if held is not None else False
        return ReleaseReply(held is not None, intact).to_wire(), []

    async def op_put_begin(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = await self._decode(PutBeginRequest, request, self.store.known_table(request.get("name")))
        if req.table is None:  # named by a digest that is not the known table's: ask for it
            return PutBeginReply.wanting_table(), []
        r = await self.store.reserve(req.name, req.device, req.table, req.origin or f"put by {session.peer}")
        session.reservations.add(r.id)
        try:
            replica, fds = self.store.write_descriptor(r, local=session.local)
        except BaseException:
            session.reservations.discard(r.id)
            self.store.abort(r.id)
            raise
        return PutBeginReply(r.id, r.manifest.offsets, r.manifest.nbytes, replica).to_wire(), fds

    async def op_put_commit(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = PutCommitRequest.from_wire(request, InvalidArgument)
        self._own(session, req.reservation)
        held = await self.store.commit(req.reservation, req.values(), req.fp)
        session.reservations.discard(req.reservation)
        self._moved(session, held, "write")
        return PutCommitReply(held.manifest.version).to_wire(), []

    async def op_put_abort(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        rid = PutAbortRequest.from_wire(request, InvalidArgument).reservation
        self._own(session, rid)
        assert isinstance(rid, int)
        self.store.abort(rid)
        session.reservations.discard(rid)
        return PutAbortReply().to_wire(), []
