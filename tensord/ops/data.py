"""Reading and writing versions: open (pin a version for a reader, here or on another node),
release, and a put's three steps (reserve a slab, commit it as a version, or abort)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tensord.held import MountPin
from tensord.ops.args import args, fp_definition, is_int
from tensord.ops.base import Ops
from tensord.owned import OwnedSlab
from tensord.rpc import Session
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.messages import OpenReply, OpenRequest
from tensord_contract.names import check_name


class DataOps(Ops):
    async def op_open(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        args(request, "name", optional=("version", "exclude", "have", "mount"))  # no unknown keys
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
        if held is not None and held.live and self.store.node not in exclude:
            replica, fds = self.store.descriptor(held, local=session.local)
            if not session.local and self.cluster is not None:  # a reader on another node
                self.cluster.serving.egress_reads += held.manifest.nbytes
            self.store.pin(held)
            self._moved(session, held, "read")
            pin = next(self._pins)
            session.pins[pin] = held
            if req.mount and session.local and not isinstance(held.slab, OwnedSlab):  # a mapping, not a copy
                held.mapped += 1
                session.pins[pin] = MountPin(held)
            known = (version, held.slab.generation) in cached
            return OpenReply(pin, version, replica, None if known else held.manifest.wire).to_wire(), fds
        if self.cluster is None:
            lost = self.restorer.lost(name, version) if self.restorer is not None else None
            message = f"{name} v{version} is not held on node {self.store.node}"
            if lost is not None:
                assert self.restorer is not None
                message = self.restorer.lost_message(name, version, lost)
            raise NotFound(message, name=name, version=version)
        reply, remote = await self.cluster.pin_remote(name, version, exclude, cached)
        pin = next(self._pins)
        session.pins[pin] = remote
        return dataclasses.replace(reply, pin=pin).to_wire(), []

    async def op_release(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (pin,) = args(request, "pin")
        held = session.pins.pop(pin, None) if is_int(pin) else None
        intact = await self._unpin(held) if held is not None else False
        return {"released": held is not None, "intact": intact}, []

    async def op_put_begin(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, device, tensors, origin = args(request, "name", "device", "tensors", optional=("origin",))
        if not isinstance(device, str):
            raise InvalidArgument("device must be a string like 'cpu' or 'cuda:0'")
        origin = self._origin(origin)
        check_name(name)
        table = await self._table(tensors)
        r = await self.store.reserve(name, device, table, origin or f"put by {session.peer}")
        session.reservations.add(r.id)
        try:
            replica, fds = self.store.write_descriptor(r, local=session.local)
        except BaseException:
            session.reservations.discard(r.id)
            self.store.abort(r.id)
            raise
        offsets = r.manifest.offsets.astype("<i8", copy=False).tobytes()
        return {"reservation": r.id, "offsets": offsets, "nbytes": r.manifest.nbytes, "replica": replica}, fds

    async def op_put_commit(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        rid, fingerprints, fp = args(request, "reservation", "fingerprints", optional=("fp",))
        self._own(session, rid)
        if not isinstance(fingerprints, bytes) or len(fingerprints) % 8:
            raise InvalidArgument("fingerprints must be bytes: one little-endian uint64 per tensor")
        fps = np.frombuffer(fingerprints, dtype="<u8").astype(np.uint64)
        held = await self.store.commit(rid, fps, fp_definition(fp))
        session.reservations.discard(rid)
        self._moved(session, held, "write")
        return {"version": held.manifest.version}, []

    async def op_put_abort(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (rid,) = args(request, "reservation")
        self._own(session, rid)
        self.store.abort(rid)
        session.reservations.discard(rid)
        return {}, []
