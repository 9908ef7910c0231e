"""What exists and where: ls, info, delete, status, nodes, and wait (a long poll for the next
version of a name)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from tensord import __version__
from tensord.ops.args import MAX_WAIT, args, is_int, is_number
from tensord.ops.base import OFF_LOOP_TENSORS, Ops
from tensord.rpc import Session
from tensord_contract.errors import InvalidArgument, NotFound, TensordError, Unavailable
from tensord_contract.messages import DeleteReply, DeleteRequest
from tensord_contract.names import MAX_VERSION, check_name, check_prefix, check_version

log = logging.getLogger(__name__)


class CatalogueOps(Ops):
    async def op_wait(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Long poll: the next version of `name` committed after `after`, or None at timeout."""
        name, after, timeout = args(request, "name", "after", optional=("timeout",))
        check_name(name)
        if not is_int(after, 0, MAX_VERSION):
            raise InvalidArgument("after must be an integer from 0 to 2**63-1")
        timeout = 30.0 if timeout is None else timeout
        if not is_number(timeout, 0, MAX_WAIT):
            raise InvalidArgument(f"timeout must lie between 0 and {MAX_WAIT} seconds")
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
            version = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            if task.done() and task.exception() is not None:
                watches.pop(name, None)
                raise Unavailable(f"watching {name} failed: {task.exception()}") from None
            return {"version": None}, []
        watches[name] = (task, queue, version)
        return {"version": version}, []

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
        (prefix,) = args(request, optional=("prefix",))
        registry = self.registry
        out = []
        for name in await registry.names(check_prefix(prefix or "")):
            versions = await registry.versions(name)
            if not versions:
                continue
            try:
                latest = await registry.resolve(name)
                manifest = await self._manifest(name, latest)
            except NotFound:  # deleted while listing
                continue
            replicas = await registry.replicas(name, latest)
            out.append(
                {
                    "name": name,
                    "latest": latest,
                    "versions": versions,
                    "nbytes": manifest.data_bytes,
                    "tensors": len(manifest),
                    "origin": manifest.origin,
                    "device": ",".join(sorted({f"{r.node}:{r.device}" if self.cluster else r.device for r in replicas}))
                    or None,
                }
            )
        return out, []

    async def op_info(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version, rows = args(request, "name", optional=("version", "tensors"))
        if rows is not None and not isinstance(rows, bool) and rows != "columns":
            raise InvalidArgument("tensors must be true, false or 'columns'")
        registry = self.registry
        version = await self.store.resolve_version(check_name(name), check_version(version))
        held = self.store.lookup(name, version)
        manifest = await self._manifest(name, version)
        out = {
            "name": name,
            "version": version,
            "latest": await registry.resolve(name),
            "versions": await registry.versions(name),
            "count": len(manifest),
            "dtypes": manifest.dtype_counts(),
            "nbytes": manifest.data_bytes,
            "slab_bytes": manifest.nbytes,
            "created": manifest.created,
            "origin": manifest.origin,
            "device": held.slab.device if held else None,
            "pins": held.pins if held else 0,
            "published": bool(held and held.slab.published),  # in a publishing process's memory: no copy here
            "mapped": held.mapped if held else 0,  # mounts of it by clients here (no copy either)
            "lost": self.restorer.lost(name, version) if self.restorer is not None else None,
            "evicted": self.store.evicted(name, version) is not None,
            "replicas": [r.to_wire() for r in await registry.replicas(name, version)],
            "partials": [
                {"node": p.node, "device": p.device, "held": p.held, "chunks": p.count, "chunk": p.chunk}
                for p in await registry.partials(name, version)
            ],
        }
        if rows == "columns":  # the table as the manifest's columns (encoded once per manifest)
            out["tensors"] = {k: manifest.wire[k] for k in ("count", "names", "dtypes", "ndims", "dims")}
        elif rows:
            out["tensors"] = (
                await asyncio.to_thread(manifest.rows) if len(manifest) > OFF_LOOP_TENSORS else manifest.rows()
            )
        return out, []

    async def op_status(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        args(request)
        store = self.store
        return {
            "node": self.node,
            "version": __version__,
            "uptime": time.time() - self.started,
            "listen": self.listen,
            "transport": self.context.transport.describe() if self.context.transport is not None else None,
            **store.status(),
            "restore": self.restorer.status() if self.restorer is not None else None,
            "egress": self.serving.status() if self.serving is not None else {"bytes": 0},
            "pulls": self.cluster.pulls_status() if self.cluster is not None else [],
            "pairs": self.pairs.status() if self.pairs is not None else None,
            "registry": self.registry.status(),
            "loads": [{"name": n, "done": p.done, "total": p.total} for n, p in self._loads.values()],
        }, []

    async def op_nodes(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Live nodes with their capacity and, where reachable, their use."""
        args(request)
        records = await self.registry.nodes()

        async def status(record: Any) -> dict[str, Any] | None:
            if record.node == self.node:
                return dict((await self.op_status(session, {"op": "status"}))[0])
            if self.cluster is None or self.peers is None:
                return None
            with contextlib.suppress(TensordError, TimeoutError):
                peer = self.peers.get(record.node, record.control)
                return dict((await asyncio.wait_for(peer.call("status"), 5.0))[0])
            return None

        statuses = await asyncio.gather(*(status(r) for r in records))
        return [{**r.to_wire(), "status": s} for r, s in zip(records, statuses, strict=True)], []
