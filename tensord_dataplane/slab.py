"""The slab accessor interface (`open_slab` in `opening` builds one from a replica descriptor).

A slab is one replica's memory: on this node a memfd (`host.HostAccess`), a CUDA allocation
(`gpu.GpuAccess`) or a publishing process's allocations (`published_ipc.PublishedIpcAccess`), elsewhere a range
of another node's registered memory (`remote.RemoteAccess`).
Every operation takes whole tables (numpy arrays of offsets, sizes, pointers), never one
tensor at a time.
"""

from __future__ import annotations

import numpy as np
import torch

from tensord_contract.manifest import Manifest
from tensord_dataplane.views import TensorMap


class SlabAccess:
    """One replica's memory as seen by this process."""

    device: str
    nbytes: int
    generation: int
    #: its owner may withdraw it during a read (a publisher's memory): a release says whether it did
    revocable = False
    #: reads check fingerprints unless the caller says otherwise (a publisher's memory)
    verify_by_default = False

    def base(self) -> torch.Tensor:
        """The whole slab as a flat uint8 tensor (same node only): mounts view it."""
        raise NotImplementedError

    def views(self, manifest: Manifest) -> TensorMap:
        """Zero-copy views of the manifest's tensors (same node only)."""
        return TensorMap(manifest, self.base()[: manifest.nbytes], manifest.offsets)

    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        """Copy slab bytes ``[src[i], src[i] + lengths[i])`` to ``dst[at[i]:]`` (a flat uint8 tensor)."""
        raise NotImplementedError

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        """Copy ``sizes[i]`` slab bytes at ``offsets[i]`` to address ``ptrs[i]`` on `device`."""
        raise NotImplementedError

    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        """Copy ``sizes[i]`` bytes at address ``ptrs[i]`` on `device` to slab offset ``offsets[i]``."""
        raise NotImplementedError

    def fingerprints(self, offsets: np.ndarray, sizes: np.ndarray, version: int = 0) -> np.ndarray | None:
        """Fingerprints (definition `version`; 0: the current one) of slab ranges, computed where
        the slab lies; None if it lies elsewhere."""
        return None

    def finish(self) -> None:
        """Wait for copies in flight: call before the pin or reservation is given up."""

    def close(self) -> None:
        pass
