"""CUDA allocation bounds, for registering device memory with a Transfer Engine.

Mooncake's intra-node NVLink transport exports a registered range with cudaIpcGetMemHandle,
which always describes the whole allocation, and the reading side relocates addresses from
the registered start. A range that starts inside an allocation (as torch's caching allocator
hands out) would therefore be read at the wrong offset: register whole allocations.
"""

from __future__ import annotations

import ctypes
import functools

from sdk.errors import TransferError


@functools.cache
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemGetAddressRange_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.c_uint64]  # fmt: skip
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
