"""The tensord client: put, get, mount, load_into over one daemon connection (ls, info, delete
and the other catalogue ops come from `sdk.catalogue`, which needs no torch).

Every operation works on whole sets in bulk: a manifest is a few arrays (`tensord_contract.manifest`), a
read or write is one table of copies (`sdk.dataplane`), and the tensors a read returns are
views built on first use (`sdk.dataplane.views.TensorMap`). Manifests are cached by (name,
version, replica generation): reopening a version this client has seen transfers none.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from sdk.catalogue import CatalogueClient
from sdk.connection import Connection
from sdk.dataplane.fingerprint import fingerprints as fingerprints_of
from sdk.dataplane.fingerprint import slab_fingerprints
from sdk.dataplane.remote import RemoteSlab
from sdk.dataplane.slab import Slab, open_slab
from sdk.dataplane.views import TensorMap
from sdk.tensors import describe
from sdk.transport.base import Transport
from tensord_contract.bulk import paused_gc
from tensord_contract.descriptors import replica_from_wire
from tensord_contract.errors import (
    IntegrityError,
    InvalidArgument,
    NotFound,
    ProtocolError,
    TensordError,
    TransferError,
    Unavailable,
)
from tensord_contract.manifest import ALIGN, DTYPE_CODES, Manifest, Table, table_of
from tensord_contract.names import check_name, check_version

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_REPLICAS = 8  # distinct replicas one read tries before giving up
_CACHED_MANIFESTS = 32  # manifests a client keeps, by (name, version, replica generation)


@dataclass(frozen=True)
class _Pin:
    """A pin and the connection that holds it: it can only be given back on that connection
    (pin ids restart with the daemon, so another connection's pin may bear the same id)."""

    conn: Connection
    id: int
    name: str
    version: int


class Mount:
    """Zero-copy views of one pinned version on this node; the pin lasts until `close()`.

    `tensors` is a `TensorMap` (a dict-like mapping; views are built on first use). Host memory
    is mapped copy-on-write: writing to a view changes only this process's copy, and the views
    stay readable after close. GPU memory is shared: views alias the daemon's slab, so never
    write to them, and do not use them after close.
    """

    def __init__(self, client: Client, pin: _Pin, manifest: Manifest, slab: Slab) -> None:
        self._client, self._slab = client, slab
        self._pin: _Pin | None = pin
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.tensors = TensorMap(manifest, slab.base()[: manifest.nbytes], manifest.offsets)

    def verify(self) -> None:
        """Check every tensor's fingerprint where the slab lies (IntegrityError on mismatch)."""
        if not self._pin:
            raise InvalidArgument("this mount is closed")
        m = self.manifest
        _check(m, None, slab_fingerprints(self.tensors.base, m.offsets, m.sizes), m.fingerprints)

    def close(self) -> None:
        if self._pin:
            pin, self._pin = self._pin, None
            self._slab.close()
            self._client._release(pin)

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reservation:
    """A slab reserved for a new version: write every tensor, then `commit()` (or `abort()`).

    Readers see nothing until commit; a reservation that is neither committed nor aborted is
    released when its connection closes. Fingerprints are computed at commit, in bulk, over the
    slab (or, for a slab on another node, over the sources as they are written); `written`
    records one the caller computed itself.
    """

    def __init__(self, client: Client, rid: int, manifest: Manifest, slab: Slab, conn: Connection) -> None:
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
            raise InvalidArgument(_mismatch(self.manifest, rows, d.dtypes, list(tensors)))
        if not np.array_equal(d.dims, _dims_of(table, rows)):
            raise InvalidArgument(_mismatch(self.manifest, rows, d.dtypes, list(tensors), d.dims, d.ndims))
        offsets = self.manifest.offsets[rows]
        for device, sel in d.by_device().items():
            self.slab.write_from(d.ptrs[sel], offsets[sel], d.sizes[sel], device)
        if isinstance(self.slab, RemoteSlab):  # no local view of the slab: hash the sources
            self._fps[rows] = fingerprints_of(d.tensors)
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
        result, _ = self._client._call_on(
            self._conn, self._lost(), "put_commit", reservation=self._rid, fingerprints=self._fps.tobytes()
        )
        self._rid = 0
        return int(result["version"])

    def abort(self) -> None:
        if self._rid:
            rid, self._rid = self._rid, 0
            try:
                self.slab.finish()
            finally:
                self.slab.close()
                self._client._call_on(self._conn, self._lost(), "put_abort", reservation=rid)

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


class Client(CatalogueClient):
    """A connection to one tensord daemon. Thread-safe; a context manager; unusable after close.

    `socket`: path of the local daemon's Unix socket. `address`: "host:port" of a daemon's TCP
    listener, for a process on a node without a daemon. Default: $TENSORD_ADDR if set, else
    $TENSORD_SOCKET, else /run/tensord/tensord.sock. `token`: for listeners that require one
    (default: $TENSORD_TOKEN). `timeout`: seconds to wait for any one reply.

    The catalogue and cluster ops (ls, info, delete, status, nodes, replicate, watch,
    load_checkpoint) come from `sdk.catalogue.CatalogueClient`; this class adds the data plane.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        timeout: float | None = 300.0,
    ) -> None:
        super().__init__(socket, address=address, token=token, timeout=timeout)
        self._engine: Transport | None = None
        self._manifests: collections.OrderedDict[tuple[str, int, int], Manifest] = collections.OrderedDict()

    # -- the Transfer Engine ------------------------------------------------------------------
    def _transport(self) -> Transport:
        """This process's Transfer Engine, started on first use (reads from other nodes)."""
        with self._lock:
            if self._engine is None:
                from sdk.transport.mooncake import MooncakeTransport

                conn = self._connection
                info = (conn.server.get("transport") if conn is not None else None) or {}
                protocol = os.environ.get("TENSORD_TRANSPORT") or info.get("protocol") or "tcp"
                hostname = (
                    os.environ.get("TENSORD_TRANSPORT_HOST")
                    or (info.get("hostname") if conn is not None and conn.is_local else None)
                    or "127.0.0.1"
                )
                self._engine = MooncakeTransport(hostname, protocol)
            return self._engine

    def close(self) -> None:
        """Close the connection; the daemon releases every pin and reservation it held."""
        super().close()
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    # -- reading ----------------------------------------------------------------------------
    def _open(self, name: str, version: int | None, exclude: list[str] | None = None) -> tuple[_Pin, Manifest, Slab]:
        check_name(name)
        version = check_version(version)
        args: dict[str, Any] = {"name": name, "version": version, "have": self._have(name)}
        if exclude:
            args["exclude"] = exclude
        conn = self._conn()
        result, fds = conn.call("open", **args)
        pin: _Pin | None = None
        try:
            if not isinstance(result, dict) or type(result.get("pin")) is not int:
                raise ProtocolError(f"malformed open reply: {result!r:.200}")
            pin = _Pin(conn, result["pin"], name, version or 0)
            replica = replica_from_wire(result.get("replica"))
            manifest = self._manifest(name, result, replica.generation)
            pin = _Pin(conn, result["pin"], name, manifest.version)
            if manifest.nbytes > replica.nbytes:
                raise ProtocolError(f"{name} v{manifest.version}: the manifest spans more than its slab")
            return pin, manifest, open_slab(replica, fds, transport=self._transport)
        except BaseException:  # a reply or slab this process cannot use: give everything back
            for fd in fds:
                os.close(fd)
            if pin is not None:
                with contextlib.suppress(TensordError, OSError):
                    self._release(pin)
            raise

    def _have(self, name: str) -> list[list[int]]:
        """The (version, generation) pairs of `name` whose manifests this client holds."""
        with self._lock:
            return [[v, g] for (n, v, g) in self._manifests if n == name]

    def _manifest(self, name: str, result: dict[str, Any], generation: int) -> Manifest:
        """The open reply's manifest: decoded and cached, or from the cache when it was left out."""
        version, wire = result.get("version"), result.get("manifest")
        if type(version) is not int:
            raise ProtocolError(f"malformed open reply: version {version!r:.40}")
        key = (name, version, generation)
        with self._lock:
            cached = self._manifests.get(key)
            if cached is not None:
                self._manifests.move_to_end(key)
        if wire is None:
            if cached is None:
                raise ProtocolError(f"the daemon left out the manifest of {name} v{version}, which is not cached")
            return cached
        manifest = Manifest.from_wire(wire)
        if manifest.name != name or manifest.version != version or manifest.fingerprints is None:
            raise ProtocolError(f"the daemon answered {name} v{version} with another manifest")
        with self._lock:
            self._manifests[key] = manifest
            while len(self._manifests) > _CACHED_MANIFESTS:
                self._manifests.popitem(last=False)
        return manifest

    def _release(self, pin: _Pin, *, wait: bool = True) -> bool:
        """Give a pin back; True if it held throughout (a remote node did not lose it).

        A pin on this node cannot be lost, so it can be given back without `wait`ing. A pin
        whose connection was lost (the daemon restarted) is gone: Unavailable says so."""
        if self._closed:
            return False
        lost = (
            f"{pin.name} v{pin.version}: the connection that pinned it was lost (the daemon at "
            f"{pin.conn.where} restarted or went away), and the pin with it; views of host memory "
            "stay readable in this process, views of GPU memory must not be used"
        )
        if not wait:
            if not pin.conn.alive():
                pin.conn.close()
                raise Unavailable(lost)
            pin.conn.post("release", pin=pin.id)
            return True
        result, _ = self._call_on(pin.conn, lost, "release", pin=pin.id)
        return bool(result.get("intact", True))

    def _read(self, name: str, version: int | str | None, copy: Callable[[Manifest, Slab], T]) -> T:
        """Pin a version, run `copy`, release. A copy from another node whose pin was lost or
        whose bytes failed is retried on another replica, for the same version."""
        wanted = check_version(version)
        exclude: list[str] = []
        for _ in range(_MAX_REPLICAS):
            try:
                pin, manifest, slab = self._open(name, wanted, exclude)
            except NotFound as exc:
                if not exclude:
                    raise
                raise TransferError(f"{name} v{wanted}: every replica failed ({', '.join(exclude)})",
                                    name=name, version=wanted) from exc  # fmt: skip
            wanted = manifest.version  # "latest" resolves once per read
            failure: TensordError | None = None
            try:
                value = copy(manifest, slab)
            except (TransferError, IntegrityError) as exc:
                if not isinstance(slab, RemoteSlab):
                    raise
                failure = exc
            finally:
                try:
                    slab.finish()
                finally:
                    slab.close()
                    intact = self._release(pin, wait=isinstance(slab, RemoteSlab))
            if failure is None and intact:
                return value
            assert isinstance(slab, RemoteSlab)
            log.warning(
                "read of %s v%d from node %s failed (%s); trying another replica",
                name,
                wanted,
                slab.node,
                failure or "pin lost during the read",
            )
            exclude.append(slab.node)
        raise TransferError(f"{name} v{wanted}: every replica failed ({', '.join(exclude)})", name=name, version=wanted)

    def mount(self, name: str, version: int | str | None = None) -> Mount:
        """Pin a version and map it zero-copy (same node only). Use as a context manager."""
        pin, manifest, slab = self._open(name, version)  # type: ignore[arg-type]
        try:
            return Mount(self, pin, manifest, slab)
        except BaseException:
            slab.close()
            self._release(pin)
            raise

    def get(
        self,
        name: str,
        version: int | str | None = None,
        *,
        device: str | torch.device | None = None,
        names: list[str] | None = None,
        verify: bool = False,
    ) -> TensorMap:
        """A private copy of a version's tensors on `device`, as a dict-like `TensorMap`.

        The tensors are views of one buffer per call, filled with as few copies as the layout
        allows (one for a whole set on a GPU); keeping any of them keeps that buffer alive.
        Default device: cpu for a host replica, the current CUDA device for a GPU replica.
        `names` selects a subset; `verify` checks every fingerprint (IntegrityError on mismatch).
        """
        wanted = _check_names(names)

        def copy(manifest: Manifest, slab: Slab) -> TensorMap:
            target = _target_device(device, slab.device)
            rows = None if wanted is None else _rows(manifest, wanted)
            src, sizes = (
                (manifest.offsets, manifest.sizes) if rows is None else (manifest.offsets[rows], manifest.sizes[rows])
            )
            if rows is None:  # the whole slab, padding included: one run
                at, nbytes = manifest.offsets, manifest.nbytes
                runs = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([nbytes], np.int64))
            else:
                at, nbytes = _packed(sizes)
                runs = _runs(src, at, sizes)
            buf = torch.empty(max(nbytes, ALIGN), dtype=torch.uint8, device=target)
            if nbytes:
                slab.read_runs(buf, *runs)
            if verify:
                slab.finish()
                expected = manifest.fingerprints if rows is None else manifest.fingerprints[rows]  # type: ignore[index]
                _check(manifest, rows, slab_fingerprints(buf, at, sizes), expected)
            return TensorMap(manifest, buf, at, rows)

        return self._read(name, version, copy)

    def load_into(
        self,
        target: torch.nn.Module | Mapping[str, torch.Tensor],
        name: str,
        version: int | str | None = None,
        *,
        strict: bool = True,
        verify: bool = False,
    ) -> int:
        """Copy a version straight into existing tensors (a module's state_dict or a dict).

        Names, shapes and dtypes are checked first; on any mismatch nothing is written.
        `strict`: the names must match exactly; otherwise only common names are loaded.
        Returns the version loaded.
        """
        tensors = target.state_dict() if isinstance(target, torch.nn.Module) else target
        if not isinstance(tensors, Mapping):
            raise InvalidArgument("load_into needs an nn.Module or a mapping of tensors")
        if not all(isinstance(k, str) for k in tensors):
            raise InvalidArgument("load_into needs tensors keyed by name (str)")

        def copy(manifest: Manifest, slab: Slab) -> int:
            keys, rows = _match(manifest, tensors, strict=strict)
            dsts = [tensors[k] for k in keys]
            d = describe(dsts, "targets", copy_sparse=False)
            _check_targets(manifest, rows, keys, d)
            offsets, sizes = manifest.offsets[rows], manifest.sizes[rows]
            plain = np.flatnonzero(d.dense)
            for dev, sel in d.by_device(plain).items():
                slab.read_into(d.ptrs[sel], offsets[sel], sizes[sel], dev)
            for i in np.flatnonzero(~d.dense).tolist():  # rare: through a private copy, then copy_
                tmp = torch.empty(dsts[i].shape, dtype=dsts[i].dtype, device=dsts[i].device)
                slab.read_into(np.array([tmp.data_ptr()]), offsets[i : i + 1], sizes[i : i + 1], tmp.device)
                slab.finish()
                dsts[i].copy_(tmp)
            if verify:
                slab.finish()
                _check(manifest, rows, np.array(fingerprints_of(dsts), dtype=np.uint64), manifest.fingerprints[rows])  # type: ignore[index]
            return manifest.version

        return self._read(name, version, copy)

    # -- writing ----------------------------------------------------------------------------
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
        args: dict[str, Any] = {"name": name, "device": str(device), "tensors": table.to_wire()}
        if origin is not None:
            args["origin"] = origin
        conn = self._conn()
        result, fds = conn.call("put_begin", **args)
        try:
            manifest = _reserved(name, table, result)
            replica = replica_from_wire(result.get("replica"))
            if manifest.nbytes > replica.nbytes:
                raise ProtocolError("the reserved slab is smaller than its layout")
            slab = open_slab(replica, fds, writable=True, transport=self._transport)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if isinstance(result, dict) and "reservation" in result:
                conn.call("put_abort", reservation=result["reservation"])
            raise
        return Reservation(self, result["reservation"], manifest, slab, conn)

    def put(self, name: str, tensors: Mapping[str, torch.Tensor], *, device: str | torch.device | None = None) -> int:
        """Store `tensors` as the next version of `name`; all or nothing. Returns the version.

        `device`: where the slab lives ("cpu", "cuda:N"); default: where the tensors are.
        """
        if not isinstance(tensors, Mapping):
            raise InvalidArgument("tensors must be a mapping of str to torch.Tensor")
        names = list(tensors)
        d = describe(tensors.values())
        table = Table.of_columns(names, d.dtypes, d.ndims, d.dims)
        slab_device = str(device) if device is not None else _home_device(d.devices)
        with self.reserve(name, table, device=slab_device) as reservation:
            offsets = reservation.manifest.offsets
            for dev, sel in d.by_device().items():
                reservation.slab.write_from(d.ptrs[sel], offsets[sel], d.sizes[sel], dev)
            if isinstance(reservation.slab, RemoteSlab):
                reservation.written_all(np.arange(len(names)), np.array(fingerprints_of(d.tensors), dtype=np.uint64))
            else:
                reservation._copied[:] = True
            return reservation.commit()


def _target_device(device: str | torch.device | None, slab_device: str) -> torch.device:
    if device is not None:
        return torch.device(device)
    if slab_device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _home_device(devices: list[torch.device]) -> str:
    distinct = set(devices)
    if len(distinct) > 1:
        raise InvalidArgument(f"tensors lie on several devices {sorted(map(str, distinct))}: pass device=")
    device = distinct.pop() if distinct else torch.device("cpu")
    return "cpu" if device.type == "cpu" else str(torch.device(device))


def _reserved(name: str, table: Table, result: Any) -> Manifest:
    """The manifest of a reservation from the daemon's layout; ProtocolError if it does not fit."""
    if not isinstance(result, dict) or not isinstance(result.get("offsets"), bytes):
        raise ProtocolError(f"malformed put_begin reply: {result!r:.200}")
    n = len(table)
    raw = result["offsets"]
    if len(raw) != 8 * n:
        raise ProtocolError("put_begin reply: one offset per tensor expected")
    offsets = np.frombuffer(raw, dtype="<i8").astype(np.int64)
    return Manifest(name, 0, table, offsets, result.get("nbytes"), check=ProtocolError)  # type: ignore[arg-type]


def _check_names(names: list[str] | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument("names must be a list of tensor names")
    return list(names)


def _rows(manifest: Manifest, names: list[str]) -> np.ndarray:
    index = manifest.table.index
    missing = [n for n in names if n not in index]
    if missing:
        raise NotFound(f"{manifest.name} v{manifest.version} has no tensors {missing[:5]}")
    if len(set(names)) != len(names):
        raise InvalidArgument("names must not repeat")
    return np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))


def _packed(sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """Offsets packing tensors of these sizes at ALIGN boundaries, and the buffer size."""
    aligned = (sizes + ALIGN - 1) // ALIGN * ALIGN
    return np.cumsum(aligned) - aligned, int(aligned.sum())


def _runs(src: np.ndarray, at: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies from slab offsets `src` to buffer offsets `at`, merged where both sides continue
    alike across at most the padding between two tensors (the buffer is ours: its padding may
    take the slab's)."""
    order = np.argsort(src, kind="stable")
    s, a, n = src[order], at[order], sizes[order]
    if not len(s):
        return s, a, n
    join = np.zeros(len(s), dtype=bool)
    gap = s[1:] - (s[:-1] + n[:-1])
    join[1:] = (gap >= 0) & (gap < ALIGN) & (a[1:] - a[:-1] == s[1:] - s[:-1])
    first = np.flatnonzero(~join)
    last = np.append(first[1:], len(s)) - 1
    return s[first], a[first], s[last] + n[last] - s[first]


def _match(manifest: Manifest, tensors: Mapping[str, torch.Tensor], *, strict: bool) -> tuple[list[str], np.ndarray]:
    """The target names the set holds, and their rows."""
    index = manifest.table.index
    with paused_gc():
        keys = list(tensors)
        rows = [index.get(k, -1) for k in keys]
    if strict and (len(keys) != len(manifest) or -1 in rows):
        missing = sorted(set(keys) - set(manifest.names))
        unexpected = sorted(set(manifest.names) - set(keys))
        raise InvalidArgument(
            f"names differ from {manifest.name} v{manifest.version}: "
            f"missing in the set {missing[:5]}, not in the target {unexpected[:5]}"
        )
    arr = np.array(rows, dtype=np.int64)
    keep = arr >= 0
    if not keep.all():
        keys = [k for k, ok in zip(keys, keep.tolist(), strict=True) if ok]
        arr = arr[keep]
    return keys, arr


def _dims_of(table: Table, rows: np.ndarray) -> np.ndarray:
    """The dims of `rows`, concatenated in that order."""
    if not len(rows):
        return np.zeros(0, dtype=np.int64)
    starts, counts = table.dim_starts[rows], table.ndims[rows].astype(np.int64)
    take = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    return table.dims[take]


def _check_targets(manifest: Manifest, rows: np.ndarray, keys: list[str], d: Any) -> None:
    """Every target's dtype and shape equal the set's, else InvalidArgument (nothing written)."""
    table = manifest.table
    same = np.array_equal(d.dtypes, table.dtypes[rows]) and np.array_equal(d.ndims, table.ndims[rows])
    if same and np.array_equal(d.dims, _dims_of(table, rows)):
        return
    starts = np.cumsum(d.ndims.astype(np.int64)) - d.ndims
    for i, row in enumerate(rows.tolist()):
        spec = manifest.spec(row)
        shape = tuple(d.dims[starts[i] : starts[i] + d.ndims[i]].tolist())
        if d.dtypes[i] != table.dtypes[row] or shape != spec.shape:
            got = DTYPE_CODES[d.dtypes[i]]
            raise InvalidArgument(
                f"tensor {keys[i]!r}: target is {got} {shape}, the set holds {spec.dtype} {spec.shape}"
            )


def _mismatch(
    manifest: Manifest,
    rows: np.ndarray,
    codes: np.ndarray,
    keys: list[str],
    dims: np.ndarray | None = None,
    ndims: np.ndarray | None = None,
) -> str:
    """Name the first tensor whose dtype or shape differs from the reservation."""
    table = manifest.table
    bad = np.flatnonzero(codes != table.dtypes[rows])
    if len(bad):
        i = int(bad[0])
        want = table.dtype_name(int(rows[i]))
        return f"tensor {keys[i]!r}: dtype {DTYPE_CODES[codes[i]]} differs from the reservation's {want}"
    assert dims is not None
    assert ndims is not None
    starts = np.cumsum(ndims.astype(np.int64)) - ndims
    for i, row in enumerate(rows.tolist()):
        got = tuple(dims[starts[i] : starts[i] + ndims[i]].tolist())
        if got != table.shape(row):
            return f"tensor {keys[i]!r}: shape {got} differs from the reservation's {table.shape(row)}"
    return "dtype/shape differ from the reservation"


def _check(manifest: Manifest, rows: np.ndarray | None, actual: np.ndarray, expected: np.ndarray | None) -> None:
    """IntegrityError naming the first tensor whose fingerprint differs."""
    if expected is None:
        return
    bad = np.flatnonzero(np.asarray(actual, dtype=np.uint64) != expected)
    if len(bad):
        row = int(bad[0]) if rows is None else int(rows[bad[0]])
        key = manifest.names[row]
        raise IntegrityError(
            f"tensor {key!r} of {manifest.name} v{manifest.version} fails its fingerprint",
            name=manifest.name,
            version=manifest.version,
            tensor=key,
        )
