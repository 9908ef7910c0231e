"""Publishing without a copy: a process on this node advertises tensors in its own memory (GPU
or host) as a version (`publish`) and withdraws it (`unpublish`, which waits for readers, here
and on other nodes, to let go).
The replica lives as long as the publishing connection (`tensord.owned`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import numpy as np

from tensord.ops.args import MAX_WAIT, args, fp_definition, is_number
from tensord.ops.base import Ops
from tensord.owned import OwnedSlab
from tensord.publications import withdraw
from tensord.rpc import Session
from tensord_contract.descriptors import owned_from_wire, published_from_wire
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.manifest import Manifest, check_servable
from tensord_contract.names import check_name, check_version

DRAIN_SECONDS = 60.0  # how long unpublish waits for readers by default


class PublishOps(Ops):
    async def op_publish(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, tensors, fingerprints, replica, exposed, origin, fp = args(
            request, "name", "tensors", "fingerprints", optional=("replica", "exposed", "origin", "fp")
        )
        check_name(name)
        if not session.local:
            raise InvalidArgument("publish hands the daemon a process's memory: connect over this node's Unix socket")
        origin = self._origin(origin)
        if replica is None and exposed is None:
            raise InvalidArgument("publish needs an IPC export (replica) or a Transfer Engine registration (exposed)")
        if not isinstance(replica, dict | None) or not isinstance(exposed, dict | None):
            raise InvalidArgument("replica and exposed must be maps describing the published allocations")
        table = await self._table(tensors)
        if not isinstance(fingerprints, bytes) or len(fingerprints) != 8 * len(table):
            raise InvalidArgument(f"fingerprints must be bytes: one little-endian uint64 per tensor ({len(table)})")
        offsets, nbytes = table.layout()
        owned = None if replica is None else owned_from_wire(replica, nbytes, 0, InvalidArgument)
        if owned is not None:
            owned.layout(table.sizes, InvalidArgument)
        reach = None if exposed is None else published_from_wire(exposed, self.store.node, nbytes, 0, InvalidArgument)
        if reach is not None:
            reach.layout(table.sizes, InvalidArgument)
            if owned is not None and (reach.device, reach.sizes, reach.block, reach.offset) != (
                f"cuda:{owned.device}",
                owned.sizes,
                owned.block,
                owned.offset,
            ):
                raise InvalidArgument("replica and exposed must describe the same allocations")
        handles = sum(len(h) + 5 for h in owned.handles) + 9 * len(owned.sizes) if owned is not None else 0
        handles += 17 * len(reach.sizes) if reach is not None else 0  # each allocation's address and size
        check_servable(
            len(table.names_blob), len(table), table.dims.size, InvalidArgument, extra=handles + 12 * len(table)
        )
        manifest = Manifest(
            name, 0, table, offsets, nbytes, created=time.time(), origin=origin or f"published by {session.peer}"
        )
        held = await self.store.hold_new(
            manifest,
            OwnedSlab(owned, reach, session.peer),
            np.frombuffer(fingerprints, dtype="<u8").astype(np.uint64),
            fp_definition(fp),
        )
        session.published[held.key] = held
        return {"version": held.manifest.version}, []

    async def op_unpublish(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version, timeout = args(request, "name", "version", optional=("timeout",))
        check_name(name)
        version = check_version(version, allow_latest=False)
        assert version is not None
        if timeout is not None and not is_number(timeout, 0, MAX_WAIT):
            raise InvalidArgument(f"timeout must be seconds from 0 to {MAX_WAIT:g}")
        held = session.published.pop((name, version), None)
        if held is None:
            raise NotFound(f"{name} v{version} was not published by this connection", name=name, version=version)
        await withdraw(self.store, held)
        if held.pins > 0:
            held.drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.drained.wait(), DRAIN_SECONDS if timeout is None else timeout)
        held.revoked = held.pins > 0
        return {"drained": not held.revoked, "pins": held.pins}, []

    async def withdraw_published(self, session: Session) -> None:
        """The publisher's connection closed: its memory may be gone or reused at any moment."""
        for held in session.published.values():
            await withdraw(self.store, held)
            held.revoked = held.pins > 0
        session.published.clear()
