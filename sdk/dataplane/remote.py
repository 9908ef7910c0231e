"""A slab on another node, read and written one-sided through this process's Transfer Engine.

Each batch registers the local memory it touches for its duration, one registration per
allocation (a `get` into one flat buffer needs one), moves one entry per contiguous run in one
engine batch (the engine merges entries contiguous on both sides, never across a registration
boundary), then unregisters. A batch's remote ranges all lie in the one registered slab.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from sdk.dataplane.cuda import allocation_range, current
from sdk.dataplane.descriptors import RemoteReplica
from sdk.dataplane.slab import Slab
from sdk.errors import InvalidArgument, TransferError
from sdk.transport.base import Batch, Transport

log = logging.getLogger(__name__)


class RemoteSlab(Slab):
    def __init__(self, replica: RemoteReplica, transport: Transport) -> None:
        self.node, self.session, self.address = replica.node, replica.session, replica.address
        self.nbytes, self.generation, self.device = replica.nbytes, replica.generation, replica.device
        self._transport = transport

    def base(self) -> torch.Tensor:
        raise InvalidArgument(
            f"this set lies on node {self.node}: mount needs a replica on this node "
            "(use get or load_into, or replicate the set here first)"
        )

    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        ranges = [_range(dst)]
        self._move(self._transport.read, ranges, dst.data_ptr() + at, src, lengths)

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        self._move(self._transport.read, allocations(ptrs, sizes, device), ptrs, offsets, sizes)

    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        self._move(self._transport.write, allocations(ptrs, sizes, device), ptrs, offsets, sizes)

    def _move(
        self,
        call: Callable[[str, Batch], None],
        ranges: list[tuple[int, int, str]],
        local: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
    ) -> None:
        if len(offsets) and int((offsets + sizes).max()) > self.nbytes:
            raise InvalidArgument(f"a copy reaches past the {self.nbytes}-byte slab on node {self.node}")
        registered: list[tuple[int, str]] = []
        try:
            for address, length, where in ranges:
                with current(where):
                    self._transport.register(address, length)
                registered.append((address, where))
            call(self.session, Batch(local, self.address + offsets, sizes))
        finally:
            for address, where in registered:
                try:
                    with current(where):
                        self._transport.unregister(address)
                except TransferError as exc:  # the bytes have moved; a leftover registration is harmless
                    log.warning("%s", exc.message)


def _range(t: torch.Tensor) -> tuple[int, int, str]:
    """The range to register for a tensor: its storage on the host, its allocation on a GPU."""
    if t.device.type == "cuda":
        base, size = allocation_range(t.data_ptr(), t.device.index or 0)
        return base, size, str(t.device)
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes(), "cpu"


def allocations(ptrs: np.ndarray, sizes: np.ndarray, device: torch.device) -> list[tuple[int, int, str]]:
    """The allocations holding buffers at `ptrs` on `device`: on a GPU, whole CUDA allocations
    (asked once per allocation, not per tensor); on the host, merged page-aligned ranges."""
    keep = sizes > 0
    ptrs, sizes = ptrs[keep], sizes[keep]
    order = np.argsort(ptrs)
    ptrs, ends = ptrs[order], ptrs[order] + sizes[order]
    out: list[tuple[int, int, str]] = []
    if device.type == "cuda":
        i = 0
        while i < len(ptrs):
            base, size = allocation_range(int(ptrs[i]), device.index or 0)
            out.append((base, size, str(device)))
            i = int(np.searchsorted(ptrs, base + size, side="left"))
        return out
    page = 4096
    starts, stops = ptrs // page * page, -(-ends // page) * page
    if len(starts):
        fresh = np.ones(len(starts), dtype=bool)
        fresh[1:] = starts[1:] > np.maximum.accumulate(stops)[:-1]
        first = np.flatnonzero(fresh)
        tops = np.maximum.reduceat(stops, first)
        out = [(int(a), int(b - a), "cpu") for a, b in zip(starts[first], tops, strict=True)]
    return out
