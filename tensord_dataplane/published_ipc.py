"""A process's own GPU memory as a replica (published without a copy): exporting it
(`export`, the publisher) and reading it (`PublishedIpcAccess`, readers on the same node).

The publisher's tensors stay in its allocations (one per large tensor, in torch's caching
allocator, small ones sharing 2 MiB segments); the replica lists each allocation once by its
legacy CUDA IPC handle, and each tensor by (allocation, offset). A reader maps every
allocation (about 0.2 ms each on an H200, kept a few seconds for the next read,
`tensord_dataplane.ipc`) and copies with the same batched kernel as from a daemon slab. The
manifest keeps the packed layout of a `put`, so reads address bytes as in any slab; a read is
cut into pieces at tensor boundaries (`tensord_dataplane.sources`). Other nodes, and readers
of host publications, read the same memory through the publisher's Transfer Engine
(`tensord_dataplane.published`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from tensord_contract.descriptors import PublishedIpcReplica
from tensord_contract.errors import InvalidArgument, ProtocolError, TransferError
from tensord_contract.manifest import Manifest
from tensord_dataplane.copy import device_copy, host_copy, windows
from tensord_dataplane.cuda import allocation_ranges, enable_peer_access, ipc_close, ipc_handles, ipc_open
from tensord_dataplane.ipc import mappings
from tensord_dataplane.slab import SlabAccess
from tensord_dataplane.sources import Places, Sources
from tensord_dataplane.views import TensorMap


def export(p: Places) -> PublishedIpcReplica:
    """A published IPC replica of tensors grouped by CUDA allocation (`sources.places`): the
    allocations' IPC handles and each tensor's place. InvalidArgument for memory CUDA IPC cannot
    export."""
    if not p.device.startswith("cuda"):
        raise InvalidArgument(f"CUDA IPC exports GPU memory, not {p.device}")
    device = int(p.device.partition(":")[2])
    try:
        handles = ipc_handles(p.bases, device)
    except TransferError as exc:
        raise InvalidArgument(
            f"{exc.message}: these tensors are not in memory CUDA IPC can export (torch's expandable "
            "segments, or an engine's own allocator such as vLLM's sleep mode); put a copy instead"
        ) from None
    for h, base, size in zip(handles, p.bases.tolist(), p.sizes.tolist(), strict=True):
        _exported[h] = (base, size)
    sizes = tuple(p.sizes.tolist())  # nbytes (0) is the daemon's to set, from the packed layout
    return PublishedIpcReplica(0, 0, device, tuple(handles), sizes, p.block.tobytes(), p.offset.tobytes())


#: allocations this process exported (handle -> base, size): CUDA refuses to open a process's
#: own handles, so its reads of what it published use the memory directly
_exported: dict[bytes, tuple[int, int]] = {}


class _Imported:
    """An allocation mapped here (another process's: unmapped when the last tensor over it goes)."""

    def __init__(self, handle: bytes, device: int, size: int) -> None:
        own = _exported.get(handle)
        self.device, self.ptr = device, own[0] if own is not None else ipc_open(handle, device)
        self._opened = own is None
        base, real = allocation_ranges(np.array([self.ptr], dtype=np.int64), device)[:2]
        if int(base[0]) != self.ptr or int(real[0]) < size:
            if self._opened:
                ipc_close(self.ptr, device)
                self._opened = False
            raise ProtocolError(f"the daemon described a {size}-byte allocation; the handle maps {int(real[0])} bytes")
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (self.ptr, False), "version": 3}

    def __del__(self) -> None:
        if self._opened:
            with contextlib.suppress(Exception):  # at exit CUDA may be gone already
                ipc_close(self.ptr, self.device)


def _import(handle: bytes, device: int, size: int) -> torch.Tensor:
    return torch.as_tensor(_Imported(handle, device, size), device=torch.device("cuda", device))


class PublishedIpcAccess(SlabAccess):
    """A publisher's allocations, mapped in this process; read-only."""

    #: the publisher may withdraw it during a read: releases wait to learn whether it did
    revocable = True

    def __init__(self, replica: PublishedIpcReplica, manifest: Manifest) -> None:
        sizes = manifest.sizes
        block, offset = replica.layout(sizes)
        self.device, self.nbytes, self.generation = f"cuda:{replica.device}", replica.nbytes, replica.generation
        self._here = torch.device(self.device)
        if torch.cuda.device_count() > 1:
            enable_peer_access()
        dev = replica.device
        keys = [("published", dev, h, n) for h, n in zip(replica.handles, replica.sizes, strict=True)]
        self._blocks: list[torch.Tensor] = mappings.open_many(keys, lambda k: _import(k[2], dev, k[3]))
        self._block = np.where(sizes > 0, block, 0)  # an empty tensor may name no allocation
        self._offset = np.where(sizes > 0, offset, 0)
        bases = np.array([b.data_ptr() for b in self._blocks] or [0], dtype=np.int64)
        self._sources = Sources(manifest, bases[self._block] + self._offset)

    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        self.read_into(dst.data_ptr() + at.astype(np.int64), src, lengths, dst.device)

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        k, rel, src, n = self._sources.pieces(offsets, sizes)
        dst = ptrs.astype(np.int64)[k] + rel
        if device.type == "cuda":
            if device != self._here:
                torch.cuda.current_stream(device).synchronize()
            device_copy(dst, src, n, self._here)
            return
        packed = np.cumsum(n) - n
        for idx, start, end in windows(packed, n):  # through the GPU and page-locked windows
            stage = torch.empty(end - start, dtype=torch.uint8, device=self._here)
            device_copy(stage.data_ptr() + packed[idx] - start, src[idx], n[idx], self._here)
            host = torch.empty(end - start, dtype=torch.uint8, pin_memory=True)
            host.copy_(stage)
            host_copy(dst[idx], host.data_ptr() + packed[idx] - start, n[idx])

    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        raise InvalidArgument("a published replica is read-only")

    def views(self, manifest: Manifest) -> TensorMap:
        blocks = self._blocks or [torch.empty(0, dtype=torch.uint8, device=self._here)]
        return TensorMap(manifest, blocks[0], self._offset, blocks=blocks, block=self._block)

    def finish(self) -> None:
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)

    def close(self) -> None:
        self._blocks = []
