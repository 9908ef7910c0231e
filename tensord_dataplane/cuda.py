"""CUDA driver and runtime calls torch does not expose: allocation bounds, peer access, and
copies described by raw pointers.

Mooncake's intra-node NVLink transport exports a registered range with cudaIpcGetMemHandle,
which always describes the whole allocation, and the reading side relocates addresses from
the registered start. A range that starts inside an allocation (as torch's caching allocator
hands out) would therefore be read at the wrong offset: register whole allocations
(`allocation_range`).

Everything here loads libcuda/libcudart on first use; importing this module needs no GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from tensord_contract.errors import TransferError

_P = ctypes.c_void_p


@functools.cache
def _libcuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuMemGetAddressRange_v2.argtypes = [
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_uint64,
    ]
    return lib


def driver() -> ctypes.CDLL:
    """libcuda, the driver API (loaded on first use)."""
    return _libcuda()


def cudart() -> ctypes.CDLL | None:
    """libcudart, the runtime API, or None where it is not found."""
    return _libcudart()


@functools.cache
def _libcudart() -> ctypes.CDLL | None:
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaMemcpyAsync.argtypes = [_P, _P, ctypes.c_size_t, ctypes.c_int, _P]
        return lib
    return None


_BUFFER_ID = 7  # CU_POINTER_ATTRIBUTE_BUFFER_ID: unique per allocation for the process's life


def buffer_ids(bases: list[int], device: str) -> list[int]:
    """The driver's ids of the CUDA allocations at `bases` on `device` ("cuda:N"): an address
    freed and allocated again gets a new id. TransferError if one is not an allocation."""
    import torch

    lib, out, value = _libcuda(), [], ctypes.c_ulonglong()
    with torch.cuda.device(torch.device(device)):
        for base in bases:
            rc = lib.cuPointerGetAttribute(ctypes.byref(value), _BUFFER_ID, ctypes.c_uint64(base))
            if rc != 0:
                raise TransferError(f"cuPointerGetAttribute failed for {base:#x} (CUresult {rc})")
            out.append(int(value.value))
    return out


def allocation_range(pointer: int, device: int) -> tuple[int, int]:
    """(base, size) of the CUDA allocation that contains `pointer` on `device`."""
    import torch

    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    with torch.cuda.device(device):
        rc = _libcuda().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), pointer)
    if rc != 0:
        raise TransferError(f"cuMemGetAddressRange failed for {pointer:#x} (CUresult {rc})")
    return int(base.value), int(size.value)


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # cudaIpcMemHandle_t


def _ipc_runtime() -> ctypes.CDLL:
    lib = _libcudart()
    if lib is None:
        raise TransferError("no CUDA runtime library found for CUDA IPC")
    return lib


def allocation_ranges(pointers: np.ndarray, device: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CUDA allocations holding `pointers` (sorted ascending): (bases, sizes, and for each
    pointer the index of its allocation). One driver call per allocation."""
    import torch

    lib = _libcuda()
    bases: list[int] = []
    sizes: list[int] = []
    which = np.empty(len(pointers), dtype=np.int64)
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    i = 0
    with torch.cuda.device(device):
        while i < len(pointers):
            rc = lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), int(pointers[i]))
            if rc != 0:
                raise TransferError(f"cuMemGetAddressRange failed for {int(pointers[i]):#x} (CUresult {rc})")
            j = int(np.searchsorted(pointers, base.value + size.value, "left"))
            which[i:j] = len(bases)
            bases.append(base.value)
            sizes.append(size.value)
            i = max(j, i + 1)
    return np.array(bases, dtype=np.int64), np.array(sizes, dtype=np.int64), which


def ipc_handles(bases: np.ndarray, device: int) -> list[bytes]:
    """Legacy CUDA IPC handles of allocations (by base address) on `device`; TransferError for
    memory that cannot be exported that way (virtual-memory allocations such as torch's
    expandable segments)."""
    import torch

    lib, handle, out = _ipc_runtime(), _IpcHandle(), []
    lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), _P]
    with torch.cuda.device(device):
        for base in bases.tolist():
            rc = lib.cudaIpcGetMemHandle(ctypes.byref(handle), base)
            if rc != 0:
                lib.cudaGetLastError()
                raise TransferError(f"cudaIpcGetMemHandle failed for the allocation at {base:#x} (cudaError {rc})")
            out.append(ctypes.string_at(ctypes.addressof(handle), 64))
    return out


def ipc_open(handle: bytes, device: int) -> int:
    """Map another process's allocation into this one (the same handle twice maps it once)."""
    import torch

    lib, h, ptr = _ipc_runtime(), _IpcHandle(), _P()
    lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(_P), _IpcHandle, ctypes.c_uint]
    ctypes.memmove(ctypes.addressof(h), handle, 64)
    with torch.cuda.device(device):
        rc = lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, 1)  # cudaIpcMemLazyEnablePeerAccess
    if rc != 0 or not ptr.value:
        lib.cudaGetLastError()
        raise TransferError(f"cudaIpcOpenMemHandle failed (cudaError {rc}): the publisher may have gone")
    return int(ptr.value)


def ipc_close(pointer: int, device: int) -> None:
    import torch

    lib = _ipc_runtime()
    lib.cudaIpcCloseMemHandle.argtypes = [_P]
    with torch.cuda.device(device):
        if lib.cudaIpcCloseMemHandle(pointer) != 0:
            lib.cudaGetLastError()


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

    Mooncake's intra-node NVLink transport copies with cudaMemcpy in the calling thread, and the
    batched copy kernel (`tensord_dataplane.copy`) loads another GPU's memory directly; without peer
    access the first stages through host memory (~37 GB/s on an H200 pair instead of ~350) and
    the second faults. Returns how many device pairs are enabled. Idempotent.
    """
    import torch

    lib = _libcudart()
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


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _CopyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _Location),
        ("dstLocHint", _Location),
        ("flags", ctypes.c_uint),
    ]


_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM


@functools.cache
def _batch_memcpy() -> Callable[..., int] | None:
    """The driver's cuMemcpyBatchAsync (CUDA 12.8+) with the ABI of this driver, or None."""
    try:
        lib = _libcuda()
    except OSError:
        return None
    version = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value < 12080:
        return None
    get = lib.cuGetProcAddress_v2
    get.argtypes = [ctypes.c_char_p, ctypes.POINTER(_P), ctypes.c_int, ctypes.c_uint64, ctypes.POINTER(ctypes.c_int)]
    fn, status = _P(), ctypes.c_int()
    abi = 13000 if version.value >= 13000 else 12080  # 13.0 dropped the failIdx argument
    if get(b"cuMemcpyBatchAsync", ctypes.byref(fn), abi, 0, ctypes.byref(status)) != 0 or not fn.value:
        return None
    args: list[Any] = [_P, _P, _P, ctypes.c_size_t, _P, _P, ctypes.c_size_t] + ([_P] if abi < 13000 else []) + [_P]
    call = ctypes.CFUNCTYPE(ctypes.c_int, *args)(fn.value)
    attrs = _CopyAttributes(_ORDER_STREAM, _Location(1, 0), _Location(1, 0), 0)  # hints: only for managed memory
    first = (ctypes.c_size_t * 1)(0)

    def run(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, stream: int) -> int:
        head = [dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, len(dst), ctypes.addressof(attrs), first, 1]
        fail = [ctypes.byref(ctypes.c_size_t())] if abi < 13000 else []
        return int(call(*head, *fail, stream))

    run.keep = (call, attrs, first)  # type: ignore[attr-defined]
    return run


def memcpy_table(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, stream: int) -> None:
    """Copy `sizes[i]` bytes from `src[i]` to `dst[i]` (device or host pointers, unified
    addressing) asynchronously on `stream` (not the legacy default stream): one driver call
    (cuMemcpyBatchAsync) where the driver has it, else one cudaMemcpyAsync per entry."""
    dst, src, sizes = (np.ascontiguousarray(a, dtype=np.uint64) for a in (dst, src, sizes))
    batch = _batch_memcpy()
    if batch is not None and len(dst):
        for a in range(0, len(dst), 1 << 20):
            rc = batch(dst[a : a + (1 << 20)], src[a : a + (1 << 20)], sizes[a : a + (1 << 20)], stream)
            if rc != 0:
                raise TransferError(f"cuMemcpyBatchAsync failed (CUresult {rc})")
        return
    lib = _libcudart()
    if lib is None:
        raise TransferError("no CUDA runtime library found for pointer copies")
    for d, s, n in zip(dst.tolist(), src.tolist(), sizes.tolist(), strict=True):
        rc = lib.cudaMemcpyAsync(d, s, n, 4, stream)  # cudaMemcpyDefault: direction from the pointers
        if rc != 0:
            lib.cudaGetLastError()
            raise TransferError(f"cudaMemcpyAsync of {n} bytes failed (cudaError {rc})")


# -- page-locked host memory (`tensord_dataplane.pinned`) -------------------------------------------

_HOST_REGISTER_PORTABLE, _HOST_REGISTER_MAPPED, _HOST_REGISTER_READ_ONLY = 1, 2, 8


def host_register(address: int, length: int, *, read_only: bool) -> int:
    """Page-lock `length` bytes of host memory at `address` for every GPU of this process and
    map them into the device address space (cudaHostRegister, read-only for a mapping without
    write access); returns their device address. TransferError where CUDA refuses."""
    import torch

    lib = _libcudart()
    if lib is None or not torch.cuda.is_available():
        raise TransferError("no CUDA here to page-lock host memory")
    torch.cuda.init()
    lib.cudaHostRegister.argtypes = [_P, ctypes.c_size_t, ctypes.c_uint]
    lib.cudaHostGetDevicePointer.argtypes = [ctypes.POINTER(_P), _P, ctypes.c_uint]
    flags = _HOST_REGISTER_PORTABLE | _HOST_REGISTER_MAPPED | (_HOST_REGISTER_READ_ONLY if read_only else 0)
    rc = lib.cudaHostRegister(address, length, flags)
    if rc != 0:
        lib.cudaGetLastError()
        raise TransferError(f"cudaHostRegister of {length} bytes failed (cudaError {rc})")
    pointer = _P()
    rc = lib.cudaHostGetDevicePointer(ctypes.byref(pointer), address, 0)
    if rc != 0 or not pointer.value:
        lib.cudaGetLastError()
        host_unregister(address)
        raise TransferError(f"cudaHostGetDevicePointer failed (cudaError {rc})")
    return int(pointer.value)


def host_unregister(address: int) -> None:
    """Undo `host_register` (before the memory is unmapped); errors are logged, not raised."""
    lib = _libcudart()
    if lib is None:
        return
    lib.cudaHostUnregister.argtypes = [_P]
    rc = lib.cudaHostUnregister(address)
    if rc != 0:
        lib.cudaGetLastError()
        logging.getLogger(__name__).warning("cudaHostUnregister at %#x failed (cudaError %d)", address, rc)


def memcpy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """One cudaMemcpyAsync on `stream` (direction from the pointers: unified addressing)."""
    lib = _libcudart()
    if lib is None:
        raise TransferError("no CUDA runtime library found for pointer copies")
    lib.cudaMemcpyAsync.argtypes = [_P, _P, ctypes.c_size_t, ctypes.c_int, _P]
    rc = lib.cudaMemcpyAsync(dst, src, nbytes, 4, stream)  # cudaMemcpyDefault
    if rc != 0:
        lib.cudaGetLastError()
        raise TransferError(f"cudaMemcpyAsync of {nbytes} bytes failed (cudaError {rc})")
