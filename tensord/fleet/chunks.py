"""The chunk grid of a slab.

A slab of `nbytes` is cut into chunks of `size` bytes (a multiple of 256, so every chunk starts
on a tensor-alignment boundary); the last chunk may be shorter. Bitmaps of the chunks a node
holds are the wire's (`tensord_contract.streams`: one bit per chunk, `numpy.packbits` order;
1,000 chunks fit in 125 bytes).
"""

from __future__ import annotations

import numpy as np

from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import ALIGN


class Grid:
    def __init__(self, nbytes: int, size: int) -> None:
        if size < ALIGN or size % ALIGN:
            raise InvalidArgument(f"chunk size must be a positive multiple of {ALIGN} bytes, not {size}")
        self.nbytes, self.size = nbytes, size
        self.count = max(1, -(-nbytes // size))

    def ranges(self, chunks: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Byte offsets and lengths of these chunks."""
        idx = np.asarray(chunks, dtype=np.int64)
        start = idx * self.size
        return start, np.minimum(start + self.size, self.nbytes) - start

    def bytes_of(self, chunks: np.ndarray | list[int]) -> int:
        return int(self.ranges(chunks)[1].sum())

    def covering(self, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The chunks that hold any byte of these ranges (sorted, unique)."""
        offsets, sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
        if not len(offsets):
            return np.zeros(0, dtype=np.int64)
        first = offsets // self.size
        last = (offsets + np.maximum(sizes, 1) - 1) // self.size
        out = np.concatenate([np.arange(a, b + 1) for a, b in zip(first.tolist(), last.tolist(), strict=True)])
        return np.unique(np.minimum(out, self.count - 1))
