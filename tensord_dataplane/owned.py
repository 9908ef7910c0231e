"""A process's own GPU memory as a replica (published without a copy): exporting it
(`export`, the publisher) and reading it (`OwnedSlab`, readers on the same node).

The publisher's tensors stay in its allocations (one per large tensor, in torch's caching
allocator, small ones sharing 2 MiB segments); the replica lists each allocation once by its
legacy CUDA IPC handle, and each tensor by (allocation, offset). A reader maps every
allocation (about 0.2 ms each on an H200, kept a few seconds for the next read,
`tensord_dataplane.ipc`) and copies with the same batched kernel as from a daemon slab. The
manifest keeps the packed layout of a `put`, so reads address bytes as in any slab; a read is
cut into pieces at tensor boundaries and the padding between tensors is never read.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from tensord_contract.descriptors import OwnedReplica
from tensord_contract.errors import InvalidArgument, ProtocolError, TransferError
from tensord_contract.manifest import Manifest
from tensord_dataplane.copy import device_copy, host_copy, windows
from tensord_dataplane.cuda import allocation_ranges, enable_peer_access, ipc_close, ipc_handles, ipc_open
from tensord_dataplane.ipc import mappings
from tensord_dataplane.slab import Slab
from tensord_dataplane.tensors import Described
from tensord_dataplane.views import TensorMap


def export(d: Described, names: list[str]) -> OwnedReplica:
    """Describe tensors (all dense, on one GPU) as an owned replica: their allocations' IPC
    handles and each tensor's place. InvalidArgument for tensors it cannot describe."""
    if not names:
        raise InvalidArgument("nothing to publish: give at least one tensor")
    devices = set(d.devices)
    if len(devices) != 1 or any(dev.type != "cuda" for dev in devices):
        raise InvalidArgument(
            f"publishing without a copy needs tensors on one GPU, not {sorted(map(str, devices))}: use put"
        )
    if not d.dense.all():
        bad = names[int(np.flatnonzero(~d.dense)[0])]
        raise InvalidArgument(f"tensor {bad!r} is not contiguous: publish contiguous tensors, or put a copy")
    device = devices.pop().index
    device = torch.cuda.current_device() if device is None else device
    used = np.flatnonzero(d.sizes > 0)
    order = used[np.argsort(d.ptrs[used], kind="stable")]
    block = np.zeros(len(names), dtype="<u4")
    offset = np.zeros(len(names), dtype="<u8")
    bases, sizes, which = allocation_ranges(d.ptrs[order], device)
    ends = d.ptrs[order] + d.sizes[order]
    if len(order) and (ends > bases[which] + sizes[which]).any():
        raise InvalidArgument("a tensor runs past the end of its CUDA allocation")
    block[order] = which
    offset[order] = d.ptrs[order] - bases[which]
    try:
        handles = ipc_handles(bases, device)
    except TransferError as exc:
        raise InvalidArgument(
            f"{exc.message}: these tensors are not in memory CUDA IPC can export (torch's expandable "
            "segments, or an engine's own allocator such as vLLM's sleep mode); put a copy instead"
        ) from None
    for h, base, size in zip(handles, bases.tolist(), sizes.tolist(), strict=True):
        _exported[h] = (base, size)
    nbytes = 0  # set by the daemon from the packed layout
    return OwnedReplica(nbytes, 0, device, tuple(handles), tuple(sizes.tolist()), block.tobytes(), offset.tobytes())


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


class OwnedSlab(Slab):
    """A publisher's allocations, mapped in this process; read-only."""

    #: the publisher may withdraw it during a read: releases wait to learn whether it did
    revocable = True

    def __init__(self, replica: OwnedReplica, manifest: Manifest) -> None:
        sizes = manifest.sizes
        block, offset = replica.layout(sizes)
        self.device, self.nbytes, self.generation = f"cuda:{replica.device}", replica.nbytes, replica.generation
        self._here = torch.device(self.device)
        if torch.cuda.device_count() > 1:
            enable_peer_access()
        dev = replica.device
        keys = [("owned", dev, h, n) for h, n in zip(replica.handles, replica.sizes, strict=True)]
        self._blocks: list[torch.Tensor] = mappings.open_many(keys, lambda k: _import(k[2], dev, k[3]))
        self._block = np.where(sizes > 0, block, 0)  # an empty tensor may name no allocation
        self._offset = np.where(sizes > 0, offset, 0)
        bases = np.array([b.data_ptr() for b in self._blocks] or [0], dtype=np.int64)
        order = np.argsort(manifest.offsets, kind="stable")
        self._starts = manifest.offsets[order]
        self._ends = self._starts + sizes[order]
        self._src = (bases[self._block] + self._offset)[order]

    def _pieces(self, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        """Slab ranges cut at tensor boundaries: (range index, offset in the range, source
        address, length) per piece; padding between tensors is left out."""
        o, n = offsets.astype(np.int64), sizes.astype(np.int64)
        first = np.maximum(np.searchsorted(self._starts, o, "right") - 1, 0)
        count = np.maximum(np.searchsorted(self._starts, o + n, "left") - first, 0)
        k = np.repeat(np.arange(len(o)), count)
        t = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))
        lo = np.maximum(o[k], self._starts[t])
        hi = np.minimum(o[k] + n[k], self._ends[t])
        keep = hi > lo
        k, t, lo, hi = k[keep], t[keep], lo[keep], hi[keep]
        return k, lo - o[k], self._src[t] + (lo - self._starts[t]), hi - lo

    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        self.read_into(dst.data_ptr() + at.astype(np.int64), src, lengths, dst.device)

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        k, rel, src, n = self._pieces(offsets, sizes)
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
