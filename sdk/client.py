"""The tensord client: put, get, mount, load_into, ls, info, delete over one daemon connection."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from sdk.connection import Connection, endpoint
from sdk.errors import IntegrityError, InvalidArgument, NotFound, TensordError, TransferError
from sdk.manifest import Manifest, TensorSpec, specs_to_wire
from sdk.names import check_name, check_prefix, check_version
from sdk.slabs import RemoteSlab, Slab, open_slab, pool
from sdk.tensors import dtype_name, fingerprint, fingerprints, to_dtype
from sdk.transport.base import Transport

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_REPLICAS = 8  # distinct replicas one read tries before giving up
_WATCH_POLL = 30.0  # seconds one long poll waits


class Mount:
    """Zero-copy views of one pinned version on this node; the pin lasts until `close()`.

    Host memory is mapped copy-on-write: writing to a view changes only this process's copy,
    and the views stay readable after close. GPU memory is shared: views alias the daemon's
    slab, so never write to them, and do not use them after close.
    """

    def __init__(self, client: Client, pin: int, manifest: Manifest, slab: Slab) -> None:
        self._client, self._pin, self._slab = client, pin, slab
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.tensors: dict[str, torch.Tensor] = {t.name: slab.view(t) for t in manifest.tensors}

    def close(self) -> None:
        if self._pin:
            pin, self._pin = self._pin, 0
            self._slab.close()
            self._client._release(pin)

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reservation:
    """A slab reserved for a new version: write every tensor, then `commit()` (or `abort()`).

    Readers see nothing until commit; a reservation that is neither committed nor aborted is
    released when its connection closes.
    """

    def __init__(self, client: Client, rid: int, manifest: Manifest, slab: Slab) -> None:
        self._client, self._rid, self.slab = client, rid, slab
        self.manifest = manifest
        self._fingerprints: dict[str, int] = {}

    def write(self, tensor_name: str, src: torch.Tensor) -> None:
        """Copy `src` into the slab at its place and record its fingerprint."""
        self.write_all({tensor_name: src})

    def write_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write many tensors at once: copies spread over I/O threads, fingerprints alongside."""
        specs = [self._spec(k) for k in tensors]
        for spec, src in zip(specs, tensors.values(), strict=True):
            if dtype_name(src.dtype) != spec.dtype or tuple(src.shape) != spec.shape:
                raise InvalidArgument(f"tensor {spec.name!r}: dtype/shape differ from the reservation")
        if all(t.device.type == "cpu" for t in tensors.values()):  # hash on other threads meanwhile
            futures = {k: pool().submit(fingerprint, t) for k, t in tensors.items()}
            self.slab.write_many(list(zip(specs, tensors.values(), strict=True)))
            self._fingerprints.update((k, f.result()) for k, f in futures.items())
            return
        self.slab.write_many(list(zip(specs, tensors.values(), strict=True)))
        self._fingerprints.update(zip(tensors, fingerprints(list(tensors.values())), strict=True))

    def written(self, tensor_name: str, fp: int) -> None:
        """Record the fingerprint of a tensor the caller wrote into `slab` itself."""
        self._fingerprints[self._spec(tensor_name).name] = fp

    def _spec(self, tensor_name: str) -> TensorSpec:
        if tensor_name not in self.manifest:
            raise InvalidArgument(f"tensor {tensor_name!r} is not part of this reservation")
        return self.manifest[tensor_name]

    def commit(self) -> int:
        missing = [t.name for t in self.manifest.tensors if t.name not in self._fingerprints]
        if missing:
            raise InvalidArgument(f"tensors not written before commit: {missing[:5]}")
        self.slab.finish()
        self.slab.close()  # drop write access first: the daemon seals host slabs at commit
        fps = [self._fingerprints[t.name] for t in self.manifest.tensors]
        result, _ = self._client._conn().call("put_commit", reservation=self._rid, fingerprints=fps)
        self._rid = 0
        return int(result["version"])

    def abort(self) -> None:
        if self._rid:
            rid, self._rid = self._rid, 0
            try:
                self.slab.finish()
            finally:
                self.slab.close()
                self._client._conn().call("put_abort", reservation=rid)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._rid:
            self.abort()


class Client:
    """A connection to one tensord daemon. Thread-safe; a context manager; unusable after close.

    `socket`: path of the local daemon's Unix socket. `address`: "host:port" of a daemon's TCP
    listener, for a process on a node without a daemon. Default: $TENSORD_ADDR if set, else
    $TENSORD_SOCKET, else /run/tensord/tensord.sock. `token`: for listeners that require one
    (default: $TENSORD_TOKEN). `timeout`: seconds to wait for any one reply.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        timeout: float | None = 300.0,
    ) -> None:
        self.endpoint = endpoint(socket, address)
        self.token = token if token is not None else os.environ.get("TENSORD_TOKEN")
        self.timeout = timeout
        self._connection: Connection | None = None
        self._engine: Transport | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- connection -------------------------------------------------------------------------
    def _conn(self) -> Connection:
        with self._lock:
            if self._closed:
                raise TensordError("this client is closed")
            if self._connection is None:
                self._connection = self._connect()
            return self._connection

    def _connect(self) -> Connection:
        return Connection(self.endpoint, timeout=self.timeout, identity=f"pid:{os.getpid()}", token=self.token)

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
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------------
    def _open(self, name: str, version: int | None, exclude: list[str] | None = None) -> tuple[int, Manifest, Slab]:
        check_name(name)
        version = check_version(version)
        args: dict[str, Any] = {"name": name, "version": version}
        if exclude:
            args["exclude"] = exclude
        result, fds = self._conn().call("open", **args)
        try:
            manifest = Manifest.from_wire(result["manifest"])
            return result["pin"], manifest, open_slab(result["replica"], fds, transport=self._transport)
        except BaseException:  # a reply or slab this process cannot use: give everything back
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(TensordError, OSError):
                self._release(result["pin"])
            raise

    def _release(self, pin: int, *, wait: bool = True) -> bool:
        """Give a pin back; True if it held throughout (a remote node did not lose it).

        A pin on this node cannot be lost, so it can be given back without `wait`ing."""
        conn = self._connection
        if conn is None or self._closed:
            return False
        if not wait:
            conn.post("release", pin=pin)
            return True
        result, _ = conn.call("release", pin=pin)
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
    ) -> dict[str, torch.Tensor]:
        """A private copy of a version's tensors on `device`.

        Default device: cpu for a host replica, the current CUDA device for a GPU replica.
        `names` selects a subset; `verify` checks every fingerprint (IntegrityError on mismatch).
        """

        def copy(manifest: Manifest, slab: Slab) -> dict[str, torch.Tensor]:
            target = _target_device(device, slab.device)
            out: dict[str, torch.Tensor] = {}

            def destinations() -> Iterator[tuple[TensorSpec, torch.Tensor]]:
                for s in _select(manifest, names):
                    out[s.name] = torch.empty(s.shape, dtype=to_dtype(s.dtype), device=target)
                    yield s, out[s.name]

            slab.read_many(destinations())
            if verify:
                slab.finish()
                _verify(manifest, out)
            return out

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

        def copy(manifest: Manifest, slab: Slab) -> int:
            pairs = _match(manifest, tensors, strict=strict)
            slab.read_many([(s, d) for s, d in pairs if d.is_contiguous()])
            for spec, dst in pairs:
                if not dst.is_contiguous():
                    tmp = torch.empty(spec.shape, dtype=dst.dtype, device=dst.device)
                    slab.read_into(spec, tmp)
                    dst.copy_(tmp)
            if verify:
                slab.finish()
                _verify(manifest, {spec.name: dst for spec, dst in pairs})
            return manifest.version

        return self._read(name, version, copy)

    # -- writing ----------------------------------------------------------------------------
    def reserve(
        self,
        name: str,
        specs: Mapping[str, tuple[str, tuple[int, ...]]],
        *,
        device: str = "cpu",
        origin: str | None = None,
    ) -> Reservation:
        """Reserve a slab for a new version of `name` holding tensors of these (dtype, shape).

        `origin` records where the bytes come from (e.g. "file:/models/x.safetensors")."""
        check_name(name)
        args: dict[str, Any] = {"name": name, "device": str(device), "tensors": specs_to_wire(specs)}
        if origin is not None:
            args["origin"] = origin
        result, fds = self._conn().call("put_begin", **args)
        manifest = Manifest.from_wire(result["manifest"])
        try:
            slab = open_slab(result["replica"], fds, writable=True, transport=self._transport)
        except BaseException:
            self._conn().call("put_abort", reservation=result["reservation"])
            raise
        return Reservation(self, result["reservation"], manifest, slab)

    def put(self, name: str, tensors: Mapping[str, torch.Tensor], *, device: str | torch.device | None = None) -> int:
        """Store `tensors` as the next version of `name`; all or nothing. Returns the version.

        `device`: where the slab lives ("cpu", "cuda:N"); default: where the tensors are.
        """
        if not isinstance(tensors, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise InvalidArgument("tensors must be a mapping of str to torch.Tensor")
        specs = {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        slab_device = str(device) if device is not None else _home_device(tensors.values())
        with self.reserve(name, specs, device=slab_device) as reservation:
            reservation.write_all(tensors)
            return reservation.commit()

    def load_checkpoint(self, path: str, name: str, *, device: str = "cpu", threads: int | None = None) -> int:
        """Make the daemon load a .safetensors file or Hugging Face directory that it reads itself
        (it must lie under the daemon's ingest.allowed_roots). Returns the new version."""
        args: dict[str, Any] = {"path": os.path.abspath(path), "name": check_name(name), "device": device}
        if threads is not None:
            args["threads"] = threads
        result, _ = self._conn().call("load", **args)
        return int(result["version"])

    # -- catalogue --------------------------------------------------------------------------
    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """Sets whose name starts with `prefix`: name, latest, versions, nbytes, device."""
        result, _ = self._conn().call("ls", prefix=check_prefix(prefix))
        return list(result)

    def info(self, name: str, version: int | str | None = None) -> dict[str, Any]:
        """One version: tensors (dtype, shape, nbytes), bytes, device, pins, all versions."""
        result, _ = self._conn().call("info", name=check_name(name), version=check_version(version))
        return dict(result)

    def delete(self, name: str, version: int | None = None) -> int:
        """Delete one version, or every version of `name`. Idempotent: returns how many went."""
        version = check_version(version, allow_latest=False)
        result, _ = self._conn().call("delete", name=check_name(name), version=version)
        return int(result["deleted"])

    def status(self) -> dict[str, Any]:
        """The daemon: node, devices with budget and use, sets, pins."""
        result, _ = self._conn().call("status")
        return dict(result)

    def nodes(self) -> list[dict[str, Any]]:
        """Live nodes of the cluster: node record (devices and budgets) and current status."""
        result, _ = self._conn().call("nodes")
        return list(result)

    # -- cluster ----------------------------------------------------------------------------
    def replicate(
        self, name: str, version: int | str | None = None, *, to: str | None = None, device: str | None = None
    ) -> dict[str, Any]:
        """Make node `to` (default: this client's daemon) pull a copy of a version from a peer
        and advertise it as a replica. Returns the node, version and device of the copy."""
        args: dict[str, Any] = {"name": check_name(name), "version": check_version(version)}
        if to is not None:
            args["to"] = to
        if device is not None:
            args["device"] = device
        result, _ = self._conn().call("replicate", **args)
        return dict(result)

    def watch(self, name: str, *, after: int | None = None, timeout: float | None = None) -> Iterator[int]:
        """Yield each version of `name` committed after `after` (default: the current latest),
        in order, as it is committed. Stops after `timeout` seconds without one (None: never).

        Uses a connection of its own, so the client stays usable while a watch waits.
        """
        check_name(name)
        if after is None:
            try:
                after = int(self.info(name)["latest"])
            except NotFound:
                after = 0
        conn = self._connect()
        try:
            while True:
                wait = _WATCH_POLL if timeout is None else min(_WATCH_POLL, timeout)
                result, _ = conn.call("wait", name=name, after=after, timeout=wait)
                if result["version"] is None:
                    if timeout is not None:
                        return
                    continue
                after = int(result["version"])
                yield after
        finally:
            conn.close()


def _target_device(device: str | torch.device | None, slab_device: str) -> torch.device:
    if device is not None:
        return torch.device(device)
    if slab_device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _home_device(tensors: Any) -> str:
    devices = {str(t.device) for t in tensors}
    if len(devices) > 1:
        raise InvalidArgument(f"tensors lie on several devices {sorted(devices)}: pass device=")
    device = devices.pop() if devices else "cpu"
    return "cpu" if device == "cpu" else str(torch.device(device))


def _select(manifest: Manifest, names: list[str] | None) -> list[TensorSpec]:
    if names is None:
        return list(manifest.tensors)
    missing = [n for n in names if n not in manifest]
    if missing:
        raise NotFound(f"{manifest.name} v{manifest.version} has no tensors {missing[:5]}")
    return [manifest[n] for n in names]


def _match(
    manifest: Manifest, tensors: Mapping[str, torch.Tensor], *, strict: bool
) -> list[tuple[TensorSpec, torch.Tensor]]:
    if strict:
        missing = sorted(set(tensors) - {t.name for t in manifest.tensors})
        unexpected = sorted({t.name for t in manifest.tensors} - set(tensors))
        if missing or unexpected:
            raise InvalidArgument(
                f"names differ from {manifest.name} v{manifest.version}: "
                f"missing in the set {missing[:5]}, not in the target {unexpected[:5]}"
            )
    pairs = [(manifest[k], t) for k, t in tensors.items() if k in manifest]
    for spec, t in pairs:
        if dtype_name(t.dtype) != spec.dtype or tuple(t.shape) != spec.shape:
            raise InvalidArgument(
                f"tensor {spec.name!r}: target is {t.dtype} {tuple(t.shape)}, the set holds {spec.dtype} {spec.shape}"
            )
    return pairs


def _verify(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
    for key, actual in zip(tensors, fingerprints(list(tensors.values())), strict=True):
        expected = manifest[key].fingerprint
        if expected is not None and actual != expected:
            raise IntegrityError(
                f"tensor {key!r} of {manifest.name} v{manifest.version} fails its fingerprint",
                name=manifest.name,
                version=manifest.version,
                tensor=key,
            )
