"""The slab accessor interface, and `open_slab`, which builds one from a replica descriptor.

A slab is one replica's memory: on this node a memfd (`host.HostSlab`) or a CUDA allocation
(`gpu.GpuSlab`), elsewhere a range of another node's registered memory (`remote.RemoteSlab`).
Every operation takes whole tables (numpy arrays of offsets, sizes, pointers), never one
tensor at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tensord_contract.errors import ProtocolError


class Slab:
    """One replica's memory as seen by this process."""

    device: str
    nbytes: int
    generation: int

    def base(self) -> torch.Tensor:
        """The whole slab as a flat uint8 tensor (same node only): mounts view it."""
        raise NotImplementedError

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
    replica: Any, fds: list[int], *, writable: bool = False, transport: Callable[[], Any] | None = None
) -> Slab:
    """The accessor for a decoded replica descriptor (`tensord_contract.descriptors`)."""
    from tensord_contract.descriptors import CudaReplica, HostReplica, RemoteReplica

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
    raise ProtocolError(f"unknown replica {replica!r:.80}")
