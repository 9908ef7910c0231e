"""Where a published version's bytes lie in its publisher's memory, both ends of the path.

The publisher (`places`) groups its tensors by allocation: on a GPU the CUDA allocations that
hold them (what CUDA IPC exports and a Transfer Engine registers), on the host the merged
ranges of the tensors' own bytes (so nothing else of the process is exposed). Readers
(`Sources`) translate ranges of the manifest's packed layout into pieces at the publisher's
addresses, cut at tensor boundaries; the padding between tensors is never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest
from tensord_dataplane.tensors import Described


@dataclass(frozen=True)
class Places:
    """Tensors grouped by allocation: allocation b starts at `bases[b]` and spans `sizes[b]`
    bytes; tensor i lies at `offset[i]` of allocation `block[i]` (0, 0 for an empty one)."""

    device: str
    bases: np.ndarray  # int64
    sizes: np.ndarray  # int64
    block: np.ndarray  # uint32
    offset: np.ndarray  # uint64


def places(d: Described, names: list[str]) -> Places:
    """Group dense tensors on one device by allocation; InvalidArgument for tensors that are
    not that (several devices, not contiguous, none)."""
    if not names:
        raise InvalidArgument("nothing to publish: give at least one tensor")
    devices = set(d.devices)
    if len(devices) != 1:
        raise InvalidArgument(f"publishing without a copy needs tensors on one device, not {sorted(map(str, devices))}")
    if not d.dense.all():
        bad = names[int(np.flatnonzero(~d.dense)[0])]
        raise InvalidArgument(f"tensor {bad!r} is not contiguous: publish contiguous tensors, or put a copy")
    dev = devices.pop()
    used = np.flatnonzero(d.sizes > 0)
    order = used[np.argsort(d.ptrs[used], kind="stable")]
    ptrs, ends = d.ptrs[order], d.ptrs[order] + d.sizes[order]
    if dev.type == "cuda":
        from tensord_dataplane.cuda import allocation_ranges

        index = torch.cuda.current_device() if dev.index is None else dev.index
        where = f"cuda:{index}"
        bases, sizes, which = allocation_ranges(ptrs, index)
        if len(order) and (ends > bases[which] + sizes[which]).any():
            raise InvalidArgument("a tensor runs past the end of its CUDA allocation")
    else:
        where = "cpu"
        fresh = np.ones(len(ptrs), dtype=bool)  # a new range where no earlier tensor reaches
        if len(ptrs):
            fresh[1:] = ptrs[1:] >= np.maximum.accumulate(ends)[:-1]
        first = np.flatnonzero(fresh)
        bases = ptrs[first]
        sizes = (np.maximum.reduceat(ends, first) if len(first) else ends[:0]) - bases
        which = np.cumsum(fresh) - 1
    block = np.zeros(len(names), dtype="<u4")
    offset = np.zeros(len(names), dtype="<u8")
    block[order] = which
    offset[order] = ptrs - bases[which]
    return Places(where, bases.astype(np.int64), sizes.astype(np.int64), block, offset)


class Sources:
    """The publisher's address of every byte of a manifest's packed layout (tensor bytes only)."""

    def __init__(self, manifest: Manifest, src: np.ndarray) -> None:
        """`src[i]`: the address of row i's first byte in the publisher's memory."""
        sizes = manifest.sizes
        order = np.argsort(manifest.offsets, kind="stable")
        self.starts = manifest.offsets[order].astype(np.int64)
        self.ends = self.starts + sizes[order].astype(np.int64)
        self.src = np.where(sizes > 0, src, 0).astype(np.int64)[order]

    def pieces(self, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
        """Layout ranges cut at tensor boundaries: (range index, offset in the range, source
        address, length) per piece; padding between tensors is left out."""
        o, n = offsets.astype(np.int64), sizes.astype(np.int64)
        first = np.maximum(np.searchsorted(self.starts, o, "right") - 1, 0)
        count = np.maximum(np.searchsorted(self.starts, o + n, "left") - first, 0)
        k = np.repeat(np.arange(len(o)), count)
        t = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))
        lo = np.maximum(o[k], self.starts[t])
        hi = np.minimum(o[k] + n[k], self.ends[t])
        keep = hi > lo
        k, t, lo, hi = k[keep], t[keep], lo[keep], hi[keep]
        return k, lo - o[k], self.src[t] + (lo - self.starts[t]), hi - lo
