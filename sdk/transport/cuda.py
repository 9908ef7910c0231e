"""CUDA allocation bounds, for registering device memory with a Transfer Engine.

Mooncake's intra-node NVLink transport exports a registered range with cudaIpcGetMemHandle,
which always describes the whole allocation, and the reading side relocates addresses from
the registered start. A range that starts inside an allocation (as torch's caching allocator
hands out) would therefore be read at the wrong offset: register whole allocations.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

from sdk.errors import TransferError


@functools.cache
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemGetAddressRange_v2.argtypes = [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_uint64,
    ]
    return lib


def allocation_range(pointer: int, device: int) -> tuple[int, int]:
    """(base, size) of the CUDA allocation that contains `pointer` on `device`."""
    import torch

    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    with torch.cuda.device(device):
        rc = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), pointer)
    if rc != 0:
        raise TransferError(f"cuMemGetAddressRange failed for {pointer:#x} (CUresult {rc})")
    return int(base.value), int(size.value)


@contextlib.contextmanager
def current(device: str) -> Iterator[None]:
    """Make `device` ("cuda:N") current while registering its memory (Mooncake queries the
    pointer in the current context, which fails for another GPU's memory); no-op for "cpu"."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    with torch.cuda.device(torch.device(device)):
        yield


@functools.cache
def enable_peer_access() -> int:
    """Let every GPU of this process reach every other directly (NVLink/PCIe peer access).

    Mooncake's intra-node NVLink transport copies with cudaMemcpy in the calling thread; without
    peer access between the two devices the driver stages through host memory (~37 GB/s on an
    H200 pair instead of ~350). Returns how many device pairs were enabled. Idempotent.
    """
    import torch

    lib = None
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None or not torch.cuda.is_available():
        return 0
    enabled, count = 0, torch.cuda.device_count()
    for a in range(count):
        for b in range(count):
            if a != b and torch.cuda.can_device_access_peer(a, b):
                with torch.cuda.device(a):
                    rc = lib.cudaDeviceEnablePeerAccess(b, 0)
                    if rc != 0:
                        lib.cudaGetLastError()  # or torch's next CUDA call raises it
                enabled += rc in (0, 704)  # 704: already enabled (torch enables it for its own peer copies)
    return enabled
