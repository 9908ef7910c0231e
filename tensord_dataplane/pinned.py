"""Host slabs page-locked for copies to and from GPUs (the copies: `tensord_dataplane.host_dma`).

A host slab the daemon marks ``pinned`` (its `memory.pinned_host` budget allows it) is
registered with CUDA (`cudaHostRegister`, mapped) by each process that copies it to or from a
GPU: registration in one process locks the pages for all, but the DMA engine runs at the pinned
rate only from a range registered in the process that issues the copy. Registering costs time
(every page is looked up and locked), so a reader keeps its registered mapping for the next
read (`Registrations`, as long as `tensord_dataplane.ipc.keep_seconds`), and unregisters it
before unmapping. A writer registers its own writable mapping for one put and drops it before
commit (a slab whose pages are locked cannot be sealed).

Reading needs a read-only registration (a committed slab is sealed), which not every platform
has (`cudaDevAttrHostRegisterReadOnlySupported`): where it fails (logged once) and for slabs
outside the budget, copies go through two bounce buffers of pinned memory of this process.
``TENSORD_HOST_COPY``: ``pinned`` (default: registered where allowed, else bounce), ``direct``
(as pinned, but reads let the batched copy kernel load the registered host memory itself),
``bounce`` (never register) or ``pageable`` (the path before any of this).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tensord_contract.errors import InvalidArgument, TransferError
from tensord_dataplane.copy import pool
from tensord_dataplane.cuda import host_register, host_unregister
from tensord_dataplane.ipc import keep_seconds
from tensord_dataplane.mapping import Mapping

log = logging.getLogger(__name__)

MODES = ("pinned", "direct", "bounce", "pageable")
_POPULATE = 64 << 20  # a fresh writable mapping is faulted in by threads in pieces of this size
_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def mode() -> str:
    """How host slabs are copied to and from GPUs here (``TENSORD_HOST_COPY``)."""
    value = os.environ.get("TENSORD_HOST_COPY", "pinned")
    if value not in MODES:
        raise InvalidArgument(f"TENSORD_HOST_COPY={value!r}: expected one of {', '.join(MODES)}")
    return value


@dataclass
class Registration:
    """A shared mapping of a slab file, page-locked and mapped for the GPUs of this process."""

    mapping: Mapping
    device_address: int
    key: tuple[int, ...] = ()
    users: int = 0
    used: float = 0.0

    def host(self) -> torch.Tensor:
        """The mapping as a flat uint8 CPU tensor (valid until unregistered)."""
        return self.mapping.tensor()


def register(fd: int, size: int, *, writable: bool) -> Registration:
    """Map `size` bytes of `fd` shared and register them; OSError or TransferError on failure."""
    mapping = Mapping(fd, size, writable=writable)
    try:
        started = time.perf_counter()
        if writable:
            _populate(mapping.address, size)
        device_address = host_register(mapping.address, size, read_only=not writable)
    except BaseException:
        mapping.close()
        raise
    seconds = time.perf_counter() - started
    log.debug(
        "page-locked %d bytes of a host slab in %.3f s (%.1f GB/s)", size, seconds, size / 1e9 / max(seconds, 1e-9)
    )
    return Registration(mapping, device_address)


def unregister(reg: Registration) -> None:
    """Unregister, then unmap (never the other way round)."""
    if reg.mapping.address:
        host_unregister(reg.mapping.address)
        reg.mapping.close()


@functools.cache
def _madvise() -> Any:
    fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def _populate(address: int, size: int) -> None:
    """Fault in a fresh writable mapping on the I/O threads (registration would fault every
    page on one thread); skipped where the kernel lacks MADV_POPULATE_WRITE."""
    if size < 2 * _POPULATE:
        return
    madvise = _madvise()
    parts = [(a, min(_POPULATE, size - a)) for a in range(0, size, _POPULATE)]
    if madvise(address, parts[0][1], _MADV_POPULATE_WRITE) != 0:
        return
    for f in [pool().submit(madvise, address + a, n, _MADV_POPULATE_WRITE) for a, n in parts[1:]]:
        f.result()


class Registrations:
    """This process's registered read-only mappings of host slabs, by (file, generation), kept
    for the next read and unregistered when idle. `register`/`unregister` are handed in (tests
    without CUDA hand in their own)."""

    def __init__(
        self,
        register: Callable[..., Registration] = register,
        unregister: Callable[[Registration], None] = unregister,
    ) -> None:
        self._register, self._unregister = register, unregister
        self._kept: dict[tuple[int, ...], Registration] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.failure: str | None = None  # why registration failed here: not tried again

    def acquire(self, fd: int, size: int, generation: int) -> Registration | None:
        """The registered mapping of this slab (one more user), or None where it cannot be
        registered (the caller copies the pageable way)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino, generation, size)
        with self._lock:
            hit = self._kept.get(key)
            if hit is not None:
                hit.users += 1
                return hit
            if self.failure is not None:
                return None
        try:
            reg = self._register(fd, size, writable=False)
        except (OSError, TransferError) as exc:
            with self._lock:
                if self.failure is None:
                    self.failure = str(exc)
                    log.warning("host slabs are copied at the pageable rate: %s", exc)
            return None
        reg.key, reg.users = key, 1
        with self._lock:
            other = self._kept.get(key)
            if other is None:
                self._kept[key] = reg
            else:  # another thread registered it meanwhile: use that one
                other.users += 1
        if other is not None:
            self._unregister(reg)
            return other
        return reg

    def release(self, reg: Registration) -> None:
        seconds = keep_seconds()
        with self._lock:
            reg.users -= 1
            reg.used = time.monotonic()
            drop = reg.users == 0 and seconds == 0 and self._kept.get(reg.key) is reg
            if drop:
                del self._kept[reg.key]
            elif reg.users == 0:
                self._arm(seconds)
        if drop:
            self._unregister(reg)

    def _arm(self, delay: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(max(0.1, delay), self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        seconds = keep_seconds()
        with self._lock:
            self._timer = None
            now = time.monotonic()
            idle = [k for k, r in self._kept.items() if r.users == 0 and now - r.used >= seconds]
            dropped = [self._kept.pop(k) for k in idle]
            waiting = [r.used for r in self._kept.values() if r.users == 0]
            if waiting:
                self._arm(seconds - (now - min(waiting)))
        for reg in dropped:
            self._unregister(reg)

    def clear(self) -> None:
        """Unregister every idle mapping now (also at exit, while CUDA is still up)."""
        with self._lock:
            dropped = [self._kept.pop(k) for k, r in list(self._kept.items()) if r.users == 0]
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        for reg in dropped:
            self._unregister(reg)

    def kept(self) -> int:
        return len(self._kept)


registrations = Registrations()
