"""Slabs (one contiguous allocation per replica) and per-device budgets.

Host slabs are memfds: they vanish with the daemon and the last mapping, and are sealed at
commit so that nobody, the writer included, can change a committed version. CUDA slabs are one
allocation each, exported by CUDA IPC handle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import logging
import mmap
import os
import secrets
from typing import Any

from sdk.errors import InvalidArgument, OutOfCapacity
from sdk.manifest import ALIGN

log = logging.getLogger(__name__)

_SEAL_SIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_SEAL_COMMIT = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class Slab:
    device: str
    nbytes: int
    generation: int  # random per allocation: a replica record names the allocation it describes

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        """What a client on this node needs to reach the slab, and the fds to pass with it."""
        raise NotImplementedError

    def address(self, *, writable: bool) -> int:
        """The slab's address in the daemon (for the Transfer Engine); mapped on first use."""
        raise NotImplementedError

    def unmap(self) -> None:
        """Drop the daemon's own mapping, if any (the engine must have unregistered it)."""

    def registration(self, address: int) -> tuple[int, int]:
        """The range to register with a Transfer Engine so that `address` is reachable."""
        return address, self.nbytes

    def seal(self) -> None:
        """Make the slab immutable where the platform allows it."""

    def free(self) -> None:
        raise NotImplementedError


class HostSlab(Slab):
    def __init__(self, nbytes: int, label: str) -> None:
        self.device, self.nbytes, self.generation = "cpu", nbytes, secrets.randbits(62)
        self._mapped: tuple[int, bool] | None = None  # (address, writable)
        self.fd = os.memfd_create(f"tensord:{label}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, nbytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEAL_SIZE)
        except OSError:
            os.close(self.fd)
            raise

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        return {"kind": "host", "nbytes": self.nbytes}, [self.fd]

    def address(self, *, writable: bool) -> int:
        if self._mapped is not None and self._mapped[1] == writable:
            return self._mapped[0]
        self.unmap()
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = _libc.mmap(None, self.nbytes, prot, mmap.MAP_SHARED, self.fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OutOfCapacity(f"cannot map a slab of {self.nbytes} bytes: {os.strerror(err)}")
        self._mapped = (addr, writable)
        return addr

    def unmap(self) -> None:
        if self._mapped is not None:
            _libc.munmap(self._mapped[0], self.nbytes)
            self._mapped = None

    def seal(self) -> None:
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEAL_COMMIT)
        except OSError as exc:  # EBUSY: a writable shared mapping still exists
            raise InvalidArgument(
                "cannot seal the slab: the writer still maps it writable; drop its views first"
            ) from exc

    def free(self) -> None:
        self.unmap()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CudaSlab(Slab):
    def __init__(self, nbytes: int, device: str) -> None:
        import torch

        self.device, self.nbytes, self.generation = device, nbytes, secrets.randbits(62)
        self.tensor: Any = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._ipc = list(self.tensor.untyped_storage()._share_cuda_())

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        return {"kind": "cuda", "nbytes": self.nbytes, "ipc": self._ipc}, []

    def address(self, *, writable: bool) -> int:
        return int(self.tensor.data_ptr())

    def registration(self, address: int) -> tuple[int, int]:
        from sdk.transport.cuda import allocation_range

        return allocation_range(address, self.tensor.device.index or 0)

    def free(self) -> None:
        self.tensor = None


def allocate(device: str, nbytes: int, label: str) -> Slab:
    """One slab of at least ALIGN bytes on `device` ("cpu" or "cuda:N")."""
    nbytes = max(nbytes, ALIGN)
    if device == "cpu":
        return HostSlab(nbytes, label)
    try:
        return CudaSlab(nbytes, device)
    except RuntimeError as exc:  # the CUDA allocator's out-of-memory and driver errors
        raise OutOfCapacity(f"cannot allocate {nbytes} bytes on {device}: {exc}", device=device) from exc


def detect_devices() -> dict[str, int]:
    """Every device on this machine and its total memory in bytes."""
    devices = {"cpu": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                devices[f"cuda:{i}"] = torch.cuda.get_device_properties(i).total_memory
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return devices


class Budgets:
    """Bytes each device may hold, and bytes held or reserved now."""

    def __init__(self, configured: dict[str, int | None], present: dict[str, int]) -> None:
        self.limit: dict[str, int] = {}
        for device, size in configured.items():
            if device not in present:
                log.warning("budget for %s ignored: no such device here", device)
                continue
            auto = present[device] // 2 if device == "cpu" else present[device] * 9 // 10
            self.limit[device] = auto if size is None else size
        for device, total in present.items():  # GPUs present but not configured: auto
            if device != "cpu" and device not in configured:
                self.limit[device] = total * 9 // 10
        self.used = dict.fromkeys(self.limit, 0)

    def check_device(self, device: str) -> str:
        if device == "cuda":
            device = "cuda:0"
        if device not in self.limit:
            raise InvalidArgument(f"device {device!r} is not served here; devices: {sorted(self.limit)}")
        return device

    def take(self, device: str, nbytes: int) -> None:
        if self.used[device] + nbytes > self.limit[device]:
            raise OutOfCapacity(
                f"{device}: {nbytes} bytes requested, {self.limit[device] - self.used[device]} "
                f"of {self.limit[device]} free",
                device=device,
                requested=nbytes,
            )
        self.used[device] += nbytes

    def give(self, device: str, nbytes: int) -> None:
        self.used[device] -= nbytes


def own_view(slab: Slab) -> Any:
    """The daemon's own accessor for a slab (an sdk.slabs.Slab), to fill or hash it in place."""
    from sdk.slabs import CudaSlab as CudaAccess
    from sdk.slabs import HostSlab as HostAccess

    if isinstance(slab, HostSlab):
        return HostAccess(os.dup(slab.fd), slab.nbytes, writable=True)
    if isinstance(slab, CudaSlab):
        return CudaAccess(slab.tensor)
    raise InvalidArgument(f"no accessor for a slab on {slab.device}")
