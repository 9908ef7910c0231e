"""Shared mappings of slab files that are unmapped when told, not when garbage is collected.

A writer must drop its writable mapping before the daemon can seal a slab, and Python's
``mmap`` cannot be closed while tensors view it. Views of a ``Mapping`` must not be used after
``close()``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os

import numpy as np
import torch

from tensord_contract.errors import ProtocolError, TransferError

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.preadv.restype = ctypes.c_ssize_t
_libc.preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value
#: Linux: no swap or huge-page reservation for a private (copy-on-write) mapping.
MAP_NORESERVE = 0x4000


class Mapping:
    """`length` bytes of `fd` mapped shared (read-only or writable) at `address`."""

    def __init__(self, fd: int, length: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        address = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"cannot map {length} bytes: {os.strerror(err)}")
        self.address: int = address
        self.length, self.writable = length, writable

    def tensor(self) -> torch.Tensor:
        """The whole mapping as a flat uint8 tensor (valid until `close()`)."""
        return torch.frombuffer((ctypes.c_uint8 * self.length).from_address(self.address), dtype=torch.uint8)

    def close(self) -> None:
        if self.address:
            _libc.munmap(self.address, self.length)
            self.address = 0


def map_size(fd: int, nbytes: int) -> int:
    """Bytes to map for a slab of `nbytes` in `fd`: the file's size (huge-page slabs are
    rounded up to whole pages), which must hold the slab."""
    size = os.fstat(fd).st_size
    if size < nbytes:
        raise ProtocolError(f"slab file holds {size} bytes, the slab needs {nbytes}")
    return size


def preadv(fd: int, iov: np.ndarray, offset: int) -> None:
    """Fill the buffers of `iov` (an (n, 2) int64 array of address, length) from `fd` at
    `offset` with preadv(2), looping over short reads; TransferError if the file ends first."""
    iov = np.ascontiguousarray(iov, dtype=np.int64)
    want = int(iov[:, 1].sum())
    done = 0
    while done < want:
        n = _libc.preadv(fd, iov.ctypes.data, len(iov), offset + done)
        if n < 0 and ctypes.get_errno() == errno.EINTR:
            continue
        if n <= 0:
            err = ctypes.get_errno() if n < 0 else 0
            raise TransferError(
                f"slab read stopped after {done} of {want} bytes: {os.strerror(err) if err else 'end of file'}",
                done=done,
                errno=err,
            )
        done += n
        if done < want:  # drop what was read: whole buffers, then part of the next
            ends = np.cumsum(iov[:, 1])
            k = int(np.searchsorted(ends, n, side="right"))
            iov = iov[k:].copy()
            used = n - (int(ends[k - 1]) if k else 0)
            iov[0, 0] += used
            iov[0, 1] -= used
