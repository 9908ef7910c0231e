"""The chunk grid of a slab, and bitmaps of the chunks a node holds.

A slab of `nbytes` is cut into chunks of `size` bytes (a multiple of 256, so every chunk starts
on a tensor-alignment boundary); the last chunk may be shorter. A bitmap is one bit per chunk,
`numpy.packbits` order (chunk 0 is the high bit of byte 0): 1,000 chunks fit in 125 bytes
(`tensord_contract.streams`, where the stream ops carry them).
"""

from __future__ import annotations

import numpy as np

from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import ALIGN
from tensord_contract.streams import MIN_CHUNK as MIN_CHUNK  # bitmaps and the smallest chunk: the contract's
from tensord_contract.streams import pack_bitmap as pack
from tensord_contract.streams import unpack_bitmap as unpack

__all__ = ["MIN_CHUNK", "Grid", "pack", "unpack"]


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
