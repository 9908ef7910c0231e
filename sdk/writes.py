"""Writes: `reserve` a slab for a new version, write it, `commit` (a `Reservation`), or `put` a
mapping of tensors in one call. All or nothing: readers see a version only once committed."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import os
from collections.abc import Mapping

import numpy as np
import torch

from sdk.checks import dims_of, mismatch
from sdk.connection import Connection
from sdk.modules import entries
from sdk.plans import Plans, PutPlan, keys_and_values
from sdk.replicas import ReplicaClient
from tensord_contract.descriptors import replica_from_wire
from tensord_contract.errors import InvalidArgument, ProtocolError
from tensord_contract.manifest import Manifest, Table, table_of
from tensord_contract.messages import PutAbortReply, PutAbortRequest
from tensord_contract.names import check_name
from tensord_contract.table_messages import PutBeginReply, PutBeginRequest, PutCommitReply, PutCommitRequest
from tensord_dataplane.fingerprint import FINGERPRINT_VERSION
from tensord_dataplane.fingerprint import fingerprints as fingerprints_of
from tensord_dataplane.opening import open_slab
from tensord_dataplane.remote import RemoteAccess
from tensord_dataplane.slab import SlabAccess
from tensord_dataplane.snapshot import Snapshot
from tensord_dataplane.tensors import describe


class Reservation:
    """A slab reserved for a new version: write every tensor, then `commit()` (or `abort()`).

    Readers see nothing until commit; a reservation that is neither committed nor aborted is
    released when its connection closes. Fingerprints are computed at commit, in bulk, over the
    slab (or, for a slab on another node, over the sources as they are written); `written`
    records one the caller computed itself.
    """

    def __init__(self, client: ReplicaClient, rid: int, manifest: Manifest, slab: SlabAccess, conn: Connection) -> None:
        self._client, self._rid, self.slab, self._conn = client, rid, slab, conn
        self.manifest = manifest
        n = len(manifest)
        self._fps = np.zeros(n, dtype=np.uint64)
        self._given = np.zeros(n, dtype=bool)  # fingerprint known (written() or a remote write)
        self._copied = np.zeros(n, dtype=bool)  # bytes written here: fingerprint them at commit

    def write(self, tensor_name: str, src: torch.Tensor) -> None:
        """Copy `src` into the slab at its place."""
        self.write_all({tensor_name: src})

    def write_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write many tensors at once: one table of copies per source device."""
        index = self.manifest.table.index
        try:
            rows = np.fromiter((index[k] for k in tensors), dtype=np.int64, count=len(tensors))
        except KeyError as exc:
            raise InvalidArgument(f"tensor {exc.args[0]!r} is not part of this reservation") from None
        d = describe(tensors.values())
        table = self.manifest.table
        if not (np.array_equal(d.dtypes, table.dtypes[rows]) and np.array_equal(d.ndims, table.ndims[rows])):
            raise InvalidArgument(mismatch(self.manifest, rows, d.dtypes, list(tensors)))
        if not np.array_equal(d.dims, dims_of(table, rows)):
            raise InvalidArgument(mismatch(self.manifest, rows, d.dtypes, list(tensors), d.dims, d.ndims))
        offsets = self.manifest.offsets[rows]
        for device, sel in d.by_device().items():
            self.slab.write_from(d.ptrs[sel], offsets[sel], d.sizes[sel], device)
        if isinstance(self.slab, RemoteAccess):  # no local view of the slab: hash the sources
            one = set(d.devices)
            dense = (one.pop(), d.ptrs, d.sizes) if len(one) == 1 else None  # described: every row dense
            self._fps[rows] = fingerprints_of(d.tensors, dense=dense)
            self._given[rows] = True
        else:
            self._copied[rows] = True

    def written(self, tensor_name: str, fp: int) -> None:
        """Record the fingerprint of a tensor the caller wrote into `slab` itself."""
        if tensor_name not in self.manifest:
            raise InvalidArgument(f"tensor {tensor_name!r} is not part of this reservation")
        self.written_all(np.array([self.manifest.table.index[tensor_name]]), np.array([fp], dtype=np.uint64))

    def written_all(self, rows: np.ndarray, fps: np.ndarray) -> None:
        """Record the fingerprints of rows the caller wrote itself (e.g. an ingest)."""
        self._fps[rows] = fps
        self._given[rows] = True
        self._copied[rows] = False

    def commit(self) -> int:
        done = self._given | self._copied
        if not done.all():
            missing = [self.manifest.names[i] for i in np.flatnonzero(~done)[:5].tolist()]
            raise InvalidArgument(f"tensors not written before commit: {missing}")
        if self._copied.any():
            self.slab.finish()
            rows = np.flatnonzero(self._copied)
            fps = self.slab.fingerprints(self.manifest.offsets[rows], self.manifest.sizes[rows])
            assert fps is not None  # a remote slab never marks rows copied
            self._fps[rows] = fps
        self.slab.finish()
        self.slab.close()  # drop write access first: the daemon seals host slabs at commit
        commit = PutCommitRequest.of(self._rid, self._fps, FINGERPRINT_VERSION)
        result, _ = self._client._call_on(self._conn, self._lost(), "put_commit", **commit.to_wire())
        self._rid = 0
        return PutCommitReply.from_wire(result, ProtocolError).version

    def abort(self) -> None:
        if self._rid:
            rid, self._rid = self._rid, 0
            try:
                self.slab.finish()
            finally:
                self.slab.close()
                result, _ = self._client._call_on(
                    self._conn, self._lost(), "put_abort", **PutAbortRequest(rid).to_wire()
                )
                PutAbortReply.from_wire(result, ProtocolError)

    def _lost(self) -> str:
        return (
            f"reservation for {self.manifest.name}: the connection that made it was lost (the daemon at "
            f"{self._conn.where} restarted or went away), and the reservation with it; put again"
        )

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._rid:
            self.abort()


class Writes(ReplicaClient):
    """The write half of `sdk.Client`."""

    def reserve(
        self,
        name: str,
        specs: Mapping[str, tuple[str, tuple[int, ...]]] | Table,
        *,
        device: str = "cpu",
        origin: str | None = None,
    ) -> Reservation:
        """Reserve a slab for a new version of `name` holding tensors of these (dtype, shape)
        (a mapping of name -> (dtype name, shape), or a `tensord_contract.manifest.Table`).

        `origin` records where the bytes come from (e.g. "file:/models/x.safetensors")."""
        check_name(name)
        table = specs if isinstance(specs, Table) else table_of(specs)
        return self._reserve(name, table, str(device), origin)

    def _reserve(
        self, name: str, table: Table, device: str, origin: str | None, *, by_digest: bool = False
    ) -> Reservation:
        """`by_digest`: name the table by its digest first (the daemon likely has it: a put
        again of a kept plan); sent in full if the daemon asks for it."""
        conn = self._conn()
        result, fds = conn.call("put_begin", **PutBeginRequest(name, device, table, origin, by_digest).to_wire())
        if by_digest and PutBeginReply.wants_table(result):
            result, fds = conn.call("put_begin", **PutBeginRequest(name, device, table, origin).to_wire())
        try:
            reply = PutBeginReply.from_wire(result, ProtocolError, len(table))
            manifest = Manifest(name, 0, table, reply.offsets, reply.nbytes, check=ProtocolError)
            replica = replica_from_wire(reply.replica)
            if manifest.nbytes > replica.nbytes:
                raise ProtocolError("the reserved slab is smaller than its layout")
            slab = open_slab(replica, fds, writable=True, transport=self._transport)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            rid = PutBeginReply.reservation_of(result)
            if rid is not None:
                conn.call("put_abort", **PutAbortRequest(rid).to_wire())
            raise
        return Reservation(self, reply.reservation, manifest, slab, conn)

    def put(
        self,
        name: str,
        tensors: torch.nn.Module | Mapping[str, torch.Tensor],
        *,
        device: str | torch.device | None = None,
    ) -> int:
        """Store `tensors` as the next version of `name`; all or nothing. Returns the version.

        `tensors`: a mapping of names to tensors, or a module (its `state_dict()` entries, read
        without torch's walk and detaching where that gives the same: `sdk.modules`).
        `device`: where the slab lives ("cpu", "cuda:N"); default: where the tensors are.
        """
        names, values = keys_and_values(entries(tensors, "put"))
        wanted = None if device is None else str(device)
        found = self._plans.get("put", name)
        plan = found if isinstance(found, PutPlan) and found.fits(names, values, wanted) else None
        kept = plan is not None
        if plan is None:
            plan = _put_plan(names, values, Snapshot.take(values), wanted)
            if plan.snapshot is not None:
                self._plans.keep("put", name, plan)
        # a kept plan's table was most likely put before: named by its digest (~6 MB less at 90k)
        with self._reserve(name, plan.table, plan.device, None, by_digest=kept) as reservation:
            plan.copies(reservation.manifest.offsets, self._plans.lock).write(reservation.slab)
            if isinstance(reservation.slab, RemoteAccess):
                sources = plan.described.tensors or values  # a kept plan holds no tensor
                fps = np.array(fingerprints_of(sources), dtype=np.uint64)
                reservation.written_all(np.arange(len(names)), fps)
            else:
                reservation._copied[:] = True
            return reservation.commit()

    @functools.cached_property
    def _plans(self) -> Plans:
        return Plans()


def _put_plan(names: list[str], values: list[torch.Tensor], snapshot: Snapshot | None, device: str | None) -> PutPlan:
    """Describe the tensors (InvalidArgument for what cannot be stored) into a plan; one whose
    tensors are not all dense as given (put through private dense copies) gets no snapshot,
    so it is never used again."""
    d = describe(values, known=snapshot)
    table = Table.of_columns(names, d.dtypes, d.ndims, d.dims)
    slab_device = device if device is not None else _home_device(d.devices)
    if snapshot is not None and not all(map(operator.is_, d.tensors, values)):
        snapshot = None
    if snapshot is not None:  # kept: it must not keep the tensors alive
        d = dataclasses.replace(d, tensors=[])
    return PutPlan(names, snapshot, slab_device, table, d, [])


def _home_device(devices: list[torch.device]) -> str:
    distinct = set(devices)
    if len(distinct) > 1:
        raise InvalidArgument(f"tensors lie on several devices {sorted(map(str, distinct))}: pass device=")
    device = distinct.pop() if distinct else torch.device("cpu")
    return "cpu" if device.type == "cpu" else str(torch.device(device))
