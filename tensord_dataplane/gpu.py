"""A GPU slab on this node: one CUDA allocation of the daemon, opened from its IPC handle (and
kept open a few seconds for the next read, `tensord_dataplane.ipc`), or the daemon's own tensor.

Copies into one flat buffer are one device (or peer) copy per run; copies to or from many
scattered tensors on GPUs are one batched kernel over a pointer table (`tensord_dataplane.copy`),
always run on the slab's GPU (it reaches another GPU's memory by peer access, while memory
opened from an IPC handle is not always mapped for the other GPUs);
copies to or from host memory go through page-locked windows of 256 MiB. A mount's views alias
the daemon's memory.
"""

from __future__ import annotations

import numpy as np
import torch

from tensord_contract.descriptors import CudaReplica
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import ALIGN
from tensord_dataplane.copy import device_copy, host_copy, runs, windows
from tensord_dataplane.cuda import enable_peer_access
from tensord_dataplane.fingerprint import FINGERPRINT_VERSION, slab_fingerprints
from tensord_dataplane.ipc import mappings
from tensord_dataplane.slab import SlabAccess

_MANY_RUNS = 16  # more runs than this into a GPU buffer: one batched kernel instead of copies


class GpuAccess(SlabAccess):
    def __init__(self, base: torch.Tensor, generation: int = 0, *, imported: bool = False) -> None:
        """`base`: the slab as a flat uint8 CUDA tensor; `imported`: mapped from an IPC handle."""
        self.device, self.nbytes, self.generation = str(base.device), base.numel(), generation
        self._base: torch.Tensor | None = base
        self._imported = imported

    @classmethod
    def from_replica(cls, replica: CudaReplica, *, writable: bool = False) -> GpuAccess:
        if torch.cuda.device_count() > 1:
            enable_peer_access()  # before the handle opens: then every GPU here may reach it
        storage = mappings.open(list(replica.ipc), keep=not writable)
        device = torch.device("cuda", replica.device)
        base = torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (replica.nbytes,), (1,))
        return cls(base, replica.generation, imported=True)

    def base(self) -> torch.Tensor:
        if self._base is None:
            raise InvalidArgument("this slab is closed")
        return self._base

    # -- reads --------------------------------------------------------------------------------------
    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        base = self.base()
        if dst.device.type == "cuda" and len(src) > _MANY_RUNS:
            _after(dst.device, base.device)
            device_copy(at, src, lengths, base.device, dst_base=dst.data_ptr(), src_base=base.data_ptr())
            return
        for s, d, n in zip(src.tolist(), at.tolist(), lengths.tolist(), strict=True):
            dst[d : d + n].copy_(base[s : s + n], non_blocking=True)

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        base = self.base()
        if device.type == "cuda":
            _after(device, base.device)
            device_copy(ptrs, offsets, sizes, base.device, src_base=base.data_ptr())
            return
        if base.device.type == "cpu":  # a tensor-backed slab in host memory (the daemon's tests)
            host_copy(ptrs, base.data_ptr() + offsets, sizes)
            return
        order = np.argsort(offsets, kind="stable")
        ptrs, offsets, sizes = ptrs[order], offsets[order], sizes[order]
        for idx, start, end in windows(offsets, sizes):
            stage = torch.empty(end - start, dtype=torch.uint8, pin_memory=True)
            stage.copy_(base[start:end])
            host_copy(ptrs[idx], stage.data_ptr() + offsets[idx] - start, sizes[idx])

    # -- writes -------------------------------------------------------------------------------------
    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        base = self.base()
        if device.type == "cuda":
            _after(device, base.device)
            device_copy(offsets, ptrs, sizes, base.device, dst_base=base.data_ptr())
            return
        if base.device.type == "cpu":
            host_copy(base.data_ptr() + offsets, ptrs, sizes)
            return
        order = np.argsort(offsets, kind="stable")
        ptrs, offsets, sizes = ptrs[order], offsets[order], sizes[order]
        for idx, start, end in windows(offsets, sizes):
            stage = torch.empty(end - start, dtype=torch.uint8, pin_memory=True)
            host_copy(stage.data_ptr() + offsets[idx] - start, ptrs[idx], sizes[idx])
            firsts, ends = runs(offsets[idx], sizes[idx], ALIGN)  # never the bytes of other tensors
            for a, b in zip(firsts.tolist(), ends.tolist(), strict=True):
                base[a:b].copy_(stage[a - start : b - start])

    def fingerprints(self, offsets: np.ndarray, sizes: np.ndarray, version: int = 0) -> np.ndarray:
        return slab_fingerprints(self.base()[: self.nbytes], offsets, sizes, version=version or FINGERPRINT_VERSION)

    def finish(self) -> None:
        for device in range(torch.cuda.device_count()):  # the copies may have run on any GPU
            torch.cuda.synchronize(device)

    def close(self) -> None:
        """Let go of an imported slab: unmapped now unless kept (`tensord_dataplane.ipc`) or a
        mount's views still use it."""
        if self._imported:
            self._base = None


def _after(other: torch.device, here: torch.device) -> None:
    """Copies run on the slab's GPU (it reaches the other GPU's ordinary memory by peer access):
    first let work queued on the other GPU finish."""
    if other != here and here.type == "cuda":
        torch.cuda.current_stream(other).synchronize()
