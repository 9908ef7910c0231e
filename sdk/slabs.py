"""Client-side access to a slab on the same node: shared-memory files and CUDA IPC.

Host slabs are memfds (sealed once committed) passed over the Unix socket. Reads copy with
``preadv`` straight into the destination tensor (one copy, no mapping to fault in); mounts map
the file copy-on-write, so a client writing through a mount never changes what others read.
CUDA slabs are opened from IPC handles, kept open a few seconds for the next read (`sdk.ipc`); a
mount's views alias the daemon's memory.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from sdk.errors import InvalidArgument, ProtocolError, TransferError
from sdk.ipc import mappings
from sdk.manifest import TensorSpec
from sdk.mapping import MAP_NORESERVE, Mapping, map_size
from sdk.tensors import as_bytes, view_bytes
from sdk.transport.base import Entry, Transport
from sdk.transport.cuda import current

log = logging.getLogger(__name__)

_MAX_IO = 1 << 30  # Linux moves at most ~2 GiB per read/write call
_CHUNK = 32 << 20  # host copies are split into chunks spread over a few threads

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """The SDK's I/O threads (created on first use), one per core up to 32: reads into fresh
    memory are bound by page faults, which scale with threads; preadv releases the GIL."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(min(32, max(2, os.cpu_count() or 2)), thread_name_prefix="tensord-io")
        return _pool


def run_all(jobs: Sequence[Callable[[], object]]) -> None:
    """Run jobs on the I/O threads; wait for all; raise the first error."""
    if len(jobs) == 1:
        jobs[0]()
        return
    futures: list[Future[object]] = [pool().submit(job) for job in jobs]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


class Slab:
    """One replica's memory as seen by this process."""

    device: str
    nbytes: int

    def view(self, spec: TensorSpec) -> torch.Tensor:
        raise NotImplementedError

    def read_into(self, spec: TensorSpec, dst: torch.Tensor) -> None:
        """Copy one tensor's bytes into `dst` (contiguous, matching dtype and shape)."""
        dst.copy_(self.view(spec))

    def write_from(self, spec: TensorSpec, src: torch.Tensor) -> None:
        self.view(spec).copy_(src)

    def read_many(self, pairs: Iterable[tuple[TensorSpec, torch.Tensor]]) -> None:
        """Copy many tensors; `pairs` is consumed lazily, so each copy starts as soon as its
        destination exists."""
        for spec, dst in pairs:
            self.read_into(spec, dst)

    def write_many(self, pairs: Sequence[tuple[TensorSpec, torch.Tensor]]) -> None:
        for spec, src in pairs:
            self.write_from(spec, src)

    def finish(self) -> None:
        """Wait for copies in flight: call before the pin or reservation is given up."""

    def close(self) -> None:
        pass


class HostSlab(Slab):
    """A memfd on this node. Reads copy with ``preadv``; mounts map it copy-on-write; a writer
    fills its reservation through a shared mapping that ``finish()`` drops (the daemon can only
    seal a slab nobody maps writable). Huge-page slabs (hugetlbfs) take no ``write()`` at all."""

    def __init__(self, fd: int, nbytes: int, *, writable: bool = False) -> None:
        self.fd, self.nbytes, self.device = fd, nbytes, "cpu"
        self._writable = writable
        self._size = map_size(fd, nbytes)
        self._base: torch.Tensor | None = None
        self._mapping: Mapping | None = None
        self._lock = threading.Lock()

    def view(self, spec: TensorSpec) -> torch.Tensor:
        return view_bytes(self._bytes()[spec.offset : spec.offset + spec.nbytes], spec.dtype, spec.shape)

    def _bytes(self) -> torch.Tensor:
        with self._lock:
            if self._base is None:
                if self._writable:
                    self._mapping = Mapping(self.fd, self._size, writable=True)
                    self._base = self._mapping.tensor()
                else:  # copy-on-write, which the write seal allows; lives as long as its views
                    flags = mmap.MAP_PRIVATE | MAP_NORESERVE
                    mm = mmap.mmap(self.fd, self._size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    self._base = torch.frombuffer(mm, dtype=torch.uint8)
            return self._base

    def read_into(self, spec: TensorSpec, dst: torch.Tensor) -> None:
        if dst.device.type != "cpu":
            super().read_into(spec, dst)
            return
        read_exact(self.fd, as_bytes(dst), spec.offset)

    def read_many(self, pairs: Iterable[tuple[TensorSpec, torch.Tensor]]) -> None:
        pairs = list(pairs)
        jobs = self._read_jobs([(s, d) for s, d in pairs if d.device.type == "cpu"])
        super().read_many([(s, d) for s, d in pairs if d.device.type != "cpu"])
        run_all(jobs)

    # Writes (Slab.write_many): one torch copy per tensor into the mapping, which torch spreads
    # over its own threads (threads of ours on top would oversubscribe the cores).

    def _read_jobs(self, pairs: Sequence[tuple[TensorSpec, torch.Tensor]]) -> list[Callable[[], None]]:
        """One read per chunk of at most _CHUNK bytes; small tensors are grouped into one job."""
        jobs: list[Callable[[], None]] = []
        small: list[tuple[torch.Tensor, int]] = []
        for spec, t in pairs:
            buf = as_bytes(t)
            if spec.nbytes < _CHUNK:
                small.append((buf, spec.offset))
                continue
            for a in range(0, spec.nbytes, _CHUNK):
                jobs.append(functools.partial(read_exact, self.fd, buf[a : a + _CHUNK], spec.offset + a))

        def run_small() -> None:
            for b, o in small:
                read_exact(self.fd, b, o)

        if small:
            jobs.append(run_small)
        return jobs

    def finish(self) -> None:
        """Drop a writer's mapping (its views become invalid): the slab can then be sealed."""
        with self._lock:
            if self._mapping is not None:
                self._base = None
                self._mapping.close()
                self._mapping = None

    def close(self) -> None:
        self.finish()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CudaSlab(Slab):
    def __init__(self, base: torch.Tensor, *, imported: bool = False) -> None:
        """`base`: the slab as a flat uint8 CUDA tensor; `imported`: mapped from an IPC handle."""
        self.device, self.nbytes = str(base.device), base.numel()
        self._base: torch.Tensor | None = base
        self._imported = imported

    @classmethod
    def from_ipc(cls, ipc: list[Any], nbytes: int, *, writable: bool = False) -> CudaSlab:
        storage = mappings.open(ipc, keep=not writable)
        device = torch.device("cuda", int(ipc[0]))
        base = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (nbytes,), (1,))
        return cls(base, imported=True)

    def view(self, spec: TensorSpec) -> torch.Tensor:
        if self._base is None:
            raise InvalidArgument("this slab is closed")
        return view_bytes(self._base[spec.offset : spec.offset + spec.nbytes], spec.dtype, spec.shape)

    def finish(self) -> None:
        for device in range(torch.cuda.device_count()):  # the copies may have run on any GPU
            torch.cuda.synchronize(device)

    def close(self) -> None:
        """Let go of an imported slab: unmapped now unless kept (`sdk.ipc`) or a mount's views
        still use it."""
        if self._imported:
            self._base = None


class RemoteSlab(Slab):
    """A slab on another node, read and written one-sided through this process's Transfer Engine.

    Each batch registers the destination (or source) tensors' storages for its duration,
    moves one entry per tensor in one native call (entries contiguous on both sides merge),
    then unregisters them.
    """

    def __init__(self, descriptor: dict[str, Any], transport: Transport) -> None:
        try:
            self.node, self.session = str(descriptor["node"]), str(descriptor["session"])
            self.address, self.nbytes = int(descriptor["address"]), int(descriptor["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad remote replica descriptor: {descriptor!r:.200}") from exc
        self.device = str(descriptor.get("device", "cpu"))  # where the bytes lie on their node
        self._transport = transport

    def view(self, spec: TensorSpec) -> torch.Tensor:
        raise InvalidArgument(
            f"{spec.name!r} lies on node {self.node}: mount needs a replica on this node "
            "(use get or load_into, or replicate the set here first)"
        )

    def read_into(self, spec: TensorSpec, dst: torch.Tensor) -> None:
        self.read_many([(spec, dst)])

    def write_from(self, spec: TensorSpec, src: torch.Tensor) -> None:
        self.write_many([(spec, src)])

    def read_many(self, pairs: Iterable[tuple[TensorSpec, torch.Tensor]]) -> None:
        self._move(self._transport.read, list(pairs))

    def write_many(self, pairs: Sequence[tuple[TensorSpec, torch.Tensor]]) -> None:
        self._move(self._transport.write, [(s, t.contiguous()) for s, t in pairs])

    def _move(self, call: Callable[[str, list[Entry]], None], pairs: list[tuple[TensorSpec, torch.Tensor]]) -> None:
        ranges: dict[int, tuple[int, torch.device]] = {}
        entries = []
        for spec, t in pairs:
            if not t.is_contiguous():
                raise InvalidArgument(f"tensor {spec.name!r}: remote copies need contiguous tensors")
            if spec.nbytes:
                base, length = memory_range(t)
                ranges[base] = (max(length, ranges.get(base, (0, t.device))[0]), t.device)
                entries.append(Entry(t.data_ptr(), self.address + spec.offset, spec.nbytes))
        registered = []
        try:
            for address, (length, where) in ranges.items():
                with current(str(where)):
                    self._transport.register(address, length)
                registered.append((address, str(where)))
            if entries:
                call(self.session, entries)
        finally:
            for address, place in registered:
                try:
                    with current(place):
                        self._transport.unregister(address)
                except TransferError as exc:  # the bytes have moved; a leftover registration is harmless
                    log.warning("%s", exc.message)


def memory_range(t: torch.Tensor) -> tuple[int, int]:
    """The range to register for a tensor: its storage on the host, its whole allocation on a GPU."""
    if t.device.type == "cuda":
        from sdk.transport.cuda import allocation_range

        return allocation_range(t.data_ptr(), t.device.index or 0)
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def read_exact(fd: int, buf: torch.Tensor, offset: int) -> None:
    """Fill a CPU uint8 tensor from `fd` at `offset`; TransferError if the file ends first."""
    mv = buf.numpy().data if buf.numel() else memoryview(b"")
    done, total = 0, len(mv)
    while done < total:
        n = os.preadv(fd, [mv[done : done + _MAX_IO]], offset + done)
        if n <= 0:
            raise TransferError(f"slab I/O stopped after {done} of {total} bytes")
        done += n


def open_slab(
    replica: dict[str, Any],
    fds: list[int],
    *,
    writable: bool = False,
    transport: Callable[[], Transport] | None = None,
) -> Slab:
    """Build the accessor a daemon's replica descriptor describes."""
    kind, nbytes = replica.get("kind"), replica.get("nbytes")
    if kind == "remote" and transport is not None:
        return RemoteSlab(replica, transport())
    if not isinstance(nbytes, int):
        raise ProtocolError("replica descriptor lacks nbytes")
    if kind == "host":
        if len(fds) != 1:
            raise ProtocolError(f"a host slab comes with one descriptor, got {len(fds)}")
        return HostSlab(fds[0], nbytes, writable=writable)
    if kind == "cuda":
        return CudaSlab.from_ipc(replica["ipc"], nbytes, writable=writable)
    raise ProtocolError(f"unknown replica kind {kind!r}")
