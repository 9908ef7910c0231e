"""Slabs (one contiguous allocation per replica) and per-device budgets.

Host slabs are memfds (of huge pages where the kernel gives them): they vanish with the daemon
and the last mapping, and are sealed at commit so that nobody, the writer included, can change
a committed version. Within the `memory.pinned_host` budget (`PinnedHost`) a host slab is
marked pinned: clients that copy it to or from a GPU page-lock it (`tensord_dataplane.pinned`).
CUDA slabs each lie in one allocation, exported by CUDA IPC handle and kept
for later slabs when freed (`CudaBlocks`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from typing import Any

from tensord_contract.descriptors import CudaReplica, HostReplica
from tensord_contract.errors import InvalidArgument, OutOfCapacity
from tensord_contract.manifest import ALIGN
from tensord_dataplane.mapping import Mapping

log = logging.getLogger(__name__)

_SEAL_SIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
_SEAL_COMMIT = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


#: Host slabs from this size on use huge pages when `memory.huge_pages` is on and the kernel
#: has them; smaller ones are not worth pinning whole huge pages for.
HUGE_MIN_BYTES = 64 << 20


class Slab:
    device: str
    nbytes: int
    generation: int  # random per allocation: a replica record names the allocation it describes
    #: memory a client process owns and published (`tensord.published_slabs`): outside the budget, never
    #: exposed to other nodes nor freed by the daemon
    published = False

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
    """A memfd; backed by huge pages (hugetlbfs) when asked for and the kernel has them: a
    fresh slab then fills several times faster than with 4 KiB shared-memory pages."""

    def __init__(self, nbytes: int, label: str, *, huge: bool = False, pinned: PinnedHost | None = None) -> None:
        self.device, self.nbytes, self.generation = "cpu", nbytes, secrets.randbits(62)
        self._mapping: Mapping | None = None
        self._pinned: PinnedHost | None = None
        name = f"tensord:{label}"[:240]
        fd = _huge_memfd(name, nbytes) if huge and nbytes >= HUGE_MIN_BYTES else None
        self.huge = fd is not None
        self.fd = fd if fd is not None else os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            if not self.huge:
                os.ftruncate(self.fd, nbytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEAL_SIZE)
            self.size = os.fstat(self.fd).st_size  # what a mapping covers
        except OSError:
            os.close(self.fd)
            raise
        if pinned is not None and pinned.take(nbytes):
            self._pinned = pinned

    @property
    def pinned(self) -> bool:
        return self._pinned is not None

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        return HostReplica(self.nbytes, self.generation, self.pinned).to_wire(), [self.fd]

    def address(self, *, writable: bool) -> int:
        if self._mapping is not None and self._mapping.writable == writable:
            return self._mapping.address
        self.unmap()
        try:
            self._mapping = Mapping(self.fd, self.size, writable=writable)
        except OSError as exc:
            raise OutOfCapacity(f"cannot map a slab of {self.nbytes} bytes: {exc.strerror}") from exc
        return self._mapping.address

    def unmap(self) -> None:
        if self._mapping is not None:
            self._mapping.close()
            self._mapping = None

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
        if self._pinned is not None:  # its bytes go back to the pinned budget
            self._pinned.give(self.nbytes)
            self._pinned = None


def _huge_memfd(name: str, nbytes: int) -> int | None:
    """A memfd of huge pages with all of them reserved, or None where the kernel has none to
    give (no hugetlbfs, or fewer free pages than the slab needs: `vm.nr_hugepages` and
    `vm.nr_overcommit_hugepages` say how many it may use)."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    except OSError:
        return None
    try:
        page = os.fstat(fd).st_blksize
        os.ftruncate(fd, -(-nbytes // page) * page)
        # Mapping it shared reserves every page for the file (kept after unmapping), so the
        # writer's page faults cannot fail half-way.
        Mapping(fd, os.fstat(fd).st_size, writable=True).close()
        return fd
    except OSError as exc:
        os.close(fd)
        log.debug("no huge pages for a %d-byte slab (%s): using 4 KiB pages", nbytes, exc.strerror)
        return None


class CudaBlocks:
    """GPU memory for slabs: one allocation per block, exported once by CUDA IPC, kept and
    reused for later slabs instead of given back to torch.

    Reuse keeps a block's IPC handle stable, so clients keep blocks mapped between reads
    (`tensord_dataplane.ipc`) and skip the ~1 ms open and close. A block given back to torch while some
    client still maps it is parked by torch until that client closes it, so idle blocks go back
    only when they no longer fit in the device's unused budget (`shrink`) or an allocation
    does not fit otherwise (`trim`). The store owns the pool (one per store) and hands it to the
    slabs it allocates.
    """

    #: a free block is reused for a slab this much smaller at most (the rest is idle)
    SLACK = 1 / 4

    def __init__(self) -> None:
        self._free: dict[str, list[tuple[Any, list[Any]]]] = {}

    def take(self, device: str, nbytes: int) -> tuple[Any, list[Any]]:
        """A block of at least `nbytes` on `device` and its IPC export."""
        import torch

        free = self._free.setdefault(device, [])
        fits = [i for i, b in enumerate(free) if nbytes <= b[0].numel() <= nbytes + nbytes * self.SLACK]
        if fits:
            return free.pop(min(fits, key=lambda i: free[i][0].numel()))
        try:
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        except torch.OutOfMemoryError:
            if not free:
                raise
            self.trim(device)
            tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return tensor, list(tensor.untyped_storage()._share_cuda_())

    def give(self, device: str, block: tuple[Any, list[Any]]) -> None:
        self._free.setdefault(device, []).append(block)

    def idle_bytes(self, device: str) -> int:
        return sum(b[0].numel() for b in self._free.get(device, []))

    def shrink(self, device: str, room: int) -> None:
        """Give idle blocks back, largest first, until the rest fit in `room` bytes (the part
        of the device's budget no slab uses): the daemon never holds more than its budget."""
        free = self._free.get(device, [])
        free.sort(key=lambda b: b[0].numel())
        dropped = 0
        while free and self.idle_bytes(device) > max(room, 0):
            free.pop()
            dropped += 1
        if dropped:
            self._release(device, dropped)

    def trim(self, device: str) -> None:
        """Give every idle block on `device` back to torch and the driver."""
        free = self._free.get(device, [])
        dropped = len(free)
        free.clear()
        self._release(device, dropped)

    def _release(self, device: str, dropped: int) -> None:
        import torch

        torch.cuda.ipc_collect()  # blocks no client maps any more leave torch's parking
        with torch.cuda.device(torch.device(device)):
            torch.cuda.empty_cache()
        log.info("gave %d idle GPU blocks on %s back to the driver", dropped, device)


class CudaSlab(Slab):
    def __init__(self, nbytes: int, device: str, blocks: CudaBlocks) -> None:
        self.device, self.nbytes, self.generation = device, nbytes, secrets.randbits(62)
        self._blocks = blocks  # the pool its block returns to when freed
        self._block: tuple[Any, list[Any]] | None = blocks.take(device, nbytes)
        self.tensor: Any = self._block[0][:nbytes]

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        assert self._block is not None
        ipc = self._block[1]
        return CudaReplica(self.nbytes, self.generation, int(ipc[0]), tuple(ipc)).to_wire(), []

    def address(self, *, writable: bool) -> int:
        return int(self.tensor.data_ptr())

    def registration(self, address: int) -> tuple[int, int]:
        from tensord_dataplane.cuda import allocation_range

        return allocation_range(address, self.tensor.device.index or 0)

    def free(self) -> None:
        self.tensor = None
        if self._block is not None:
            self._blocks.give(self.device, self._block)
            self._block = None


def allocate(
    device: str,
    nbytes: int,
    label: str,
    blocks: CudaBlocks,
    *,
    huge_pages: bool = False,
    pinned: PinnedHost | None = None,
) -> Slab:
    """One slab of at least ALIGN bytes on `device` ("cpu" or "cuda:N"); GPU memory from `blocks`;
    a host slab marked pinned while `pinned` has room for it."""
    nbytes = max(nbytes, ALIGN)
    if device == "cpu":
        return HostSlab(nbytes, label, huge=huge_pages, pinned=pinned)
    try:
        return CudaSlab(nbytes, device, blocks)
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


class PinnedHost:
    """Bytes of host slabs that clients may page-lock (`memory.pinned_host`), and those marked
    so now. A slab that does not fit is served unpinned (copied at the pageable rate)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, nbytes: int) -> bool:
        if self.used + nbytes > self.limit:
            log.info("host slab of %d bytes not pinned: %d of %d pinned bytes in use", nbytes, self.used, self.limit)
            return False
        self.used += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.used -= nbytes


class Budgets:
    """Bytes each device may hold, and bytes held or reserved now; `pinned`: the part of the
    host's that clients may page-lock (None: as much as the cpu budget)."""

    def __init__(
        self, configured: dict[str, int | None], present: dict[str, int], pinned_host: int | None = None
    ) -> None:
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
        self.pinned = PinnedHost(self.limit.get("cpu", 0) if pinned_host is None else pinned_host)

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
    """The daemon's own accessor for a slab (a `tensord_dataplane.slab.SlabAccess`), to fill or
    hash it in place."""
    from tensord_dataplane.gpu import GpuAccess
    from tensord_dataplane.host import HostAccess

    if isinstance(slab, HostSlab):
        return HostAccess(os.dup(slab.fd), slab.nbytes, slab.generation, writable=True)
    if isinstance(slab, CudaSlab):
        return GpuAccess(slab.tensor, slab.generation)
    raise InvalidArgument(f"no accessor for a slab on {slab.device}")
