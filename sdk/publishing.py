"""Publishing without a copy: advertise tensors that stay in this process's memory (one GPU,
or host memory) as a version of a set, readable from every node (`Client.publish`).

The version exists while its `Publication` does: until `unpublish()`, or until this client's
connection closes (the process exits, the daemon restarts). Readers on this node map GPU
tensors' allocations (CUDA IPC) and copy straight out of them; readers on other nodes, and
readers of host tensors, read them one-sided through this process's Transfer Engine, with
which the allocations stay registered until `unpublish()` returns
(`tensord_dataplane.published`). The daemon holds no copy and counts no budget. The promise
the publisher makes: **no writes to published tensors until `unpublish()` returns**.
`unpublish` waits for readers still pinning the version, here and on other nodes (up to its
timeout); the publication keeps the tensors referenced, so their memory cannot be freed and
reused before. Reads from a publication check fingerprints by default.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from sdk.connection import Connection
from sdk.modules import entries
from sdk.published_layouts import Layouts
from sdk.replicas import ReplicaClient
from tensord_contract.errors import InvalidArgument, NotFound, ProtocolError, TransferError
from tensord_contract.messages import UnpublishReply, UnpublishRequest
from tensord_contract.names import check_name
from tensord_contract.table_messages import PublishReply, PublishRequest, PutBeginReply
from tensord_dataplane.fingerprint import FINGERPRINT_VERSION
from tensord_dataplane.fingerprint import fingerprints as fingerprints_of

if TYPE_CHECKING:
    from tensord_dataplane.published import Registered, SeedRanges
    from tensord_dataplane.sources import Places

log = logging.getLogger(__name__)


class Publication:
    """One published version; `unpublish()` (or leaving the `with` block) withdraws it."""

    def __init__(
        self,
        client: ReplicaClient,
        conn: Connection,
        name: str,
        version: int,
        tensors: list[torch.Tensor],
        registered: Registered | None,
    ):
        self._client, self._conn = client, conn
        self.name, self.version = name, version
        self._tensors: list[torch.Tensor] | None = tensors  # kept: their memory must not be reused
        self._registered = registered  # unregistered once withdrawn

    @property
    def published(self) -> bool:
        """Whether the version is still published (not withdrawn, connection alive)."""
        return self._tensors is not None and self._conn.alive() and not self._client.closed

    def unpublish(self, timeout: float | None = None) -> bool:
        """Withdraw the version; return once no reader pins it (True), or after `timeout`
        seconds (default 60) with readers left (False: their reads fail with TransferError,
        their mounts must not be used). Writing the tensors is safe once this returns.
        Idempotent; also answers True when the connection is gone (so is the publication)."""
        if self._tensors is None:
            return True
        request = UnpublishRequest(self.name, self.version, timeout)
        if not self._conn.alive() or self._client.closed:
            self._withdrawn()
            return True
        try:
            result, _ = self._client._call_on(self._conn, self._lost(), "unpublish", **request.to_wire())
            drained = UnpublishReply.from_wire(result, ProtocolError).drained
        except NotFound:  # deleted meanwhile (tensord rm, retention): nothing published
            drained = True
        finally:
            if not self._conn.alive():  # the connection (and the publication) went meanwhile
                self._withdrawn()
        self._withdrawn()
        return drained

    def _withdrawn(self) -> None:
        """The daemon no longer hands it out: stop serving reads of the memory, let it go."""
        if self._registered is not None:
            self._registered.close()
            self._registered = None
        self._tensors = None

    def _lost(self) -> str:
        return f"{self.name} v{self.version}: the connection that published it was lost, and the publication with it"

    def __enter__(self) -> Publication:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpublish()

    def __repr__(self) -> str:
        state = "published" if self.published else "withdrawn"
        return f"Publication({self.name} v{self.version}, {state})"


class Publishing(ReplicaClient):
    """The publishing part of `sdk.Client`."""

    # Started on the first publish read from other nodes: engines of its own (one per
    # `BUFFERS_PER_ENGINE` allocations), so that the registrations this process's reads and
    # writes make and drop never touch a publication's.
    _seeds: SeedRanges | None = None

    def close(self) -> None:
        super().close()
        with self._lock:
            seeds, self._seeds = self._seeds, None
        if seeds is not None:
            seeds.close()  # after the connection: the daemon withdrew every publication

    def publish(
        self,
        name: str,
        tensors: torch.nn.Module | Mapping[str, torch.Tensor],
        *,
        origin: str | None = None,
        remote: bool | None = None,
    ) -> Publication:
        """Advertise `tensors` (dense, all on one GPU or all in host memory; or a module: its
        `state_dict()` entries) as the next version of `name`, without a copy: readers read
        this process's memory. Do not write them until
        `unpublish()` returns. See the module doc for the lifetime.

        `remote`: register the memory with this process's Transfer Engine, so that other nodes
        can read it (host memory is always registered: every reader reads it that way). None:
        when the daemon is part of a cluster. Each engine advertises at most 2,048 allocations
        (TENSORD_ENGINE_BUFFERS; more start more engines, about a second each, in parallel);
        publishing the same GPU allocations again reuses their registration."""
        check_name(name)
        if remote is not None and not isinstance(remote, bool):
            raise InvalidArgument("remote must be True, False or None")
        tensors = entries(tensors, "publish")
        if origin is not None and not isinstance(origin, str):
            raise InvalidArgument("origin must be a string")
        names = list(tensors)
        conn = self._conn()
        if not conn.is_local:
            raise InvalidArgument("publishing without a copy needs the daemon of this node (its Unix socket)")
        values = list(tensors.values())
        layout, kept = self._layouts.find(name, names, values)  # keys are checked to be str when not kept
        where = layout.where
        if remote is None:
            remote = bool(conn.server.get("cluster"))
        registered = self._register(where, layout.ids) if remote or where.device == "cpu" else None
        try:
            dense = (torch.device(where.device), layout.ptrs, layout.sizes)
            request = PublishRequest(
                name,
                layout.table,
                np.array(fingerprints_of(values, dense=dense), dtype=np.uint64),
                FINGERPRINT_VERSION,
                layout.ipc,
                None if registered is None else registered.replica,
                origin,
                by_digest=kept,  # most likely the daemon's known table of the set (~8 MB less at 90k)
            )
            result, _ = conn.call("publish", **request.to_wire())
            if kept and PutBeginReply.wants_table(result):
                request = dataclasses.replace(request, by_digest=False)
                result, _ = conn.call("publish", **request.to_wire())
            reply = PublishReply.from_wire(result, ProtocolError)
        except BaseException:
            if registered is not None:
                registered.close()
            raise
        return Publication(self, conn, name, reply.version, values, registered)

    @functools.cached_property
    def _layouts(self) -> Layouts:
        return Layouts()

    def _register(self, where: Places, ids: tuple[int, ...]) -> Registered | None:
        """Register the allocations with this process's Transfer Engine (readers on other
        nodes, and of host memory, read through it); None where GPU memory cannot be (then
        only this node's readers reach it, by CUDA IPC)."""
        from tensord_dataplane.published import Registered, SeedRanges

        try:
            with self._lock:
                if self._seeds is None:
                    self._seeds = SeedRanges(self._start_transport(), self._start_transport)
                seeds = self._seeds
            return Registered(seeds, where, ids)
        except (TransferError, InvalidArgument) as exc:
            if where.device == "cpu":
                raise TransferError(
                    f"publishing host tensors needs this process's Transfer Engine: {exc.message}"
                ) from exc
            log.warning("publication readable on this node only: %s", exc.message)
            return None
