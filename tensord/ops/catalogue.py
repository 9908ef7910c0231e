"""What exists and where: ls, info, delete, status, nodes, and wait (a long poll for the next
version of a name)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from tensord import __version__
from tensord.ops.base import OFF_LOOP_TENSORS, Ops, unless_gone
from tensord.rpc import Session
from tensord_contract.catalogue_messages import (
    DEFAULT_WAIT,
    InfoReply,
    InfoRequest,
    LsEntry,
    LsReply,
    LsRequest,
    PartialInfo,
    WaitReply,
    WaitRequest,
)
from tensord_contract.errors import InvalidArgument, NotFound, ProtocolError, TensordError, Unavailable
from tensord_contract.messages import DeleteReply, DeleteRequest
from tensord_contract.node_messages import NodeEntry, NodesReply, NodesRequest, StatusReply, StatusRequest

log = logging.getLogger(__name__)


class CatalogueOps(Ops):
    async def op_wait(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Long poll: the next version of `name` committed after `after`, or None at timeout."""
        req = WaitRequest.from_wire(request, InvalidArgument)
        name, after, timeout = req.name, req.after, DEFAULT_WAIT if req.timeout is None else req.timeout
        watches = self._watches.setdefault(session.id, {})
        current = watches.get(name)
        if current is None or current[2] != after:
            if current is not None:
                current[0].cancel()
            queue: asyncio.Queue[int] = asyncio.Queue()
            task = asyncio.get_running_loop().create_task(self._pump(name, after, queue))
            current = watches[name] = (task, queue, after)
        task, queue, _ = current
        try:
            version = await unless_gone(session, queue.get(), timeout)
        except TimeoutError:
            if task.done() and task.exception() is not None:
                watches.pop(name, None)
                raise Unavailable(f"watching {name} failed: {task.exception()}") from None
            return WaitReply(None).to_wire(), []
        watches[name] = (task, queue, version)
        return WaitReply(version).to_wire(), []

    async def _pump(self, name: str, after: int, queue: asyncio.Queue[int]) -> None:
        async for version in self.registry.watch(name, after=after):
            queue.put_nowait(version)

    async def op_delete(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = DeleteRequest.from_wire(request, InvalidArgument)
        deleted = await self.store.delete(req.name, req.version)
        log.info("deleted %s%s: %d versions", req.name, f" v{req.version}" if req.version else "", deleted)
        return DeleteReply(deleted).to_wire(), []

    # -- catalogue ----------------------------------------------------------------------------
    async def op_ls(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = LsRequest.from_wire(request, InvalidArgument)
        registry = self.registry
        out = []
        for name in await registry.names(req.prefix):
            versions = await registry.versions(name)
            if not versions:
                continue
            try:
                latest = await registry.resolve(name)
                manifest = await self._manifest(name, latest)
            except NotFound:  # deleted while listing
                continue
            replicas = await registry.replicas(name, latest)
            where = ",".join(sorted({f"{r.node}:{r.device}" if self.cluster else r.device for r in replicas}))
            out.append(
                LsEntry(name, latest, versions, manifest.data_bytes, len(manifest), manifest.origin, where or None)
            )
        return LsReply(tuple(out)).to_wire(), []

    async def op_info(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        req = InfoRequest.from_wire(request, InvalidArgument)
        registry, name = self.registry, req.name
        version = await self.store.resolve_version(name, req.version)
        held = self.store.lookup(name, version)
        manifest = await self._manifest(name, version)
        rows: Any = None
        if req.tensors == "columns":  # the table as the manifest's columns (encoded once per manifest)
            rows = {k: manifest.wire[k] for k in ("count", "names", "dtypes", "ndims", "dims")}
        elif req.tensors:
            rows = await asyncio.to_thread(manifest.rows) if len(manifest) > OFF_LOOP_TENSORS else manifest.rows()
        return InfoReply(
            name,
            version,
            latest=await registry.resolve(name),
            versions=await registry.versions(name),
            count=len(manifest),
            dtypes=manifest.dtype_counts(),
            nbytes=manifest.data_bytes,
            slab_bytes=manifest.nbytes,
            created=manifest.created,
            origin=manifest.origin,
            device=held.slab.device if held else None,
            pins=held.pins if held else 0,
            published=bool(held and held.slab.published),
            mapped=held.mapped if held else 0,
            lost=self.restorer.lost(name, version) if self.restorer is not None else None,
            evicted=self.store.evicted(name, version) is not None,
            replicas=[r.to_wire() for r in await registry.replicas(name, version)],
            partials=[
                PartialInfo(p.node, p.device, p.held, p.count, p.chunk) for p in await registry.partials(name, version)
            ],
            tensors=rows,
        ).to_wire(), []

    async def op_status(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        StatusRequest.from_wire(request, InvalidArgument)
        return self._status().to_wire(), []

    def _status(self) -> StatusReply:
        return StatusReply(
            node=self.node,
            version=__version__,
            uptime=time.time() - self.started,
            listen=self.listen,
            transport=self.context.transport.describe() if self.context.transport is not None else None,
            **self.store.status(),
            restore=self.restorer.status() if self.restorer is not None else None,
            egress=self.serving.status() if self.serving is not None else {"bytes": 0},
            pulls=self.cluster.pulls_status() if self.cluster is not None else [],
            pairs=self.pairs.status() if self.pairs is not None else None,
            registry=self.registry.status(),
            loads=[{"name": n, "done": p.done, "total": p.total} for n, p in self._loads.values()],
        )

    async def op_nodes(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Live nodes with their capacity and, where reachable, their use."""
        NodesRequest.from_wire(request, InvalidArgument)
        records = await self.registry.nodes()

        async def status(record: Any) -> StatusReply | None:
            if record.node == self.node:
                return self._status()
            if self.cluster is None or self.peers is None:
                return None
            with contextlib.suppress(TensordError, TimeoutError):  # a malformed status too (ProtocolError)
                peer = self.peers.get(record.node, record.control)
                result, _ = await asyncio.wait_for(peer.call("status", **StatusRequest().to_wire()), 5.0)
                return StatusReply.from_wire(result, ProtocolError)
            return None

        statuses = await asyncio.gather(*(status(r) for r in records))
        nodes = [
            NodeEntry(r.node, r.host, r.control, r.transport, r.devices, s)
            for r, s in zip(records, statuses, strict=True)
        ]
        return NodesReply(tuple(nodes)).to_wire(), []
