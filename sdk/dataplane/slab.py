"""The slab accessor interface, and `open_slab`, which builds one from a replica descriptor.

A slab is one replica's memory: on this node a memfd (`host.HostSlab`), a CUDA allocation
(`gpu.GpuSlab`) or a publishing process's allocations (`owned.OwnedSlab`), elsewhere a range
of another node's registered memory (`remote.RemoteSlab`).
Every operation takes whole tables (numpy arrays of offsets, sizes, pointers), never one
tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from sdk.dataplane.views import TensorMap
from tensord_contract.errors import ProtocolError
from tensord_contract.manifest import Manifest


class Slab:
    """One replica's memory as seen by this process."""

    device: str
    nbytes: int
    generation: int
    #: its owner may withdraw it during a read (a publisher's memory): a release says whether it did
    revocable = False

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

    def fingerprints(self, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
        """Fingerprints of slab ranges, computed where the slab lies; None if it lies elsewhere."""
        return None

    def finish(self) -> None:
        """Wait for copies in flight: call before the pin or reservation is given up."""

    def close(self) -> None:
        pass


def open_slab(
    replica: Any,
    fds: list[int],
    *,
    writable: bool = False,
    transport: Callable[[], Any] | None = None,
    manifest: Manifest | None = None,
) -> Slab:
    """The accessor for a decoded replica descriptor (`tensord_contract.descriptors`); an owned
    replica needs its version's `manifest`."""
    from tensord_contract.descriptors import CudaReplica, HostReplica, OwnedReplica, RemoteReplica

    if isinstance(replica, RemoteReplica):
        if transport is None:
            raise ProtocolError("a remote replica needs a Transfer Engine")
        from sdk.dataplane.remote import RemoteSlab

        return RemoteSlab(replica, transport())
    if fds and not isinstance(replica, HostReplica):
        raise ProtocolError(f"a {replica.kind} replica comes without file descriptors")
    if isinstance(replica, HostReplica):
        if len(fds) != 1:
            raise ProtocolError(f"a host slab comes with one descriptor, got {len(fds)}")
        from sdk.dataplane.host import HostSlab

        return HostSlab(fds[0], replica.nbytes, replica.generation, writable=writable)
    if isinstance(replica, CudaReplica):
        from sdk.dataplane.gpu import GpuSlab

        return GpuSlab.from_replica(replica, writable=writable)
    if isinstance(replica, OwnedReplica):
        if writable or manifest is None:
            raise ProtocolError("a published replica is read-only and read with its manifest")
        from sdk.dataplane.owned import OwnedSlab

        return OwnedSlab(replica, manifest)
    raise ProtocolError(f"unknown replica {replica!r:.80}")
