"""The chunk grid of a slab, and bitmaps of the chunks a node holds.

A slab of `nbytes` is cut into chunks of `size` bytes (a multiple of 256, so every chunk starts
on a tensor-alignment boundary); the last chunk may be shorter. A bitmap is one bit per chunk,
`numpy.packbits` order (chunk 0 is the high bit of byte 0): 1,000 chunks fit in 125 bytes.
"""

from __future__ import annotations

import numpy as np

from tensord_contract.errors import InvalidArgument, ProtocolError
from tensord_contract.manifest import ALIGN

#: the smallest chunk: below this, per-chunk costs (an RPC, an engine entry) dominate everything
MIN_CHUNK = 64 << 10


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


def pack(held: np.ndarray) -> bytes:
    return np.packbits(held.astype(bool)).tobytes()


def unpack(data: object, count: int) -> np.ndarray:
    """A bitmap of `count` chunks from its wire form; ProtocolError if it is malformed."""
    if not isinstance(data, bytes) or len(data) != -(-count // 8):
        raise ProtocolError(f"a chunk bitmap of {count} chunks must be {-(-count // 8)} bytes")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count).astype(bool)


def chunk_list(value: object, count: int, what: str = "chunks") -> list[int]:
    """A list of chunk indices from the wire; InvalidArgument if it is not one."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > count:
        raise InvalidArgument(f"{what} must be a list of at most {count} chunk indices")
    if not all(type(c) is int and 0 <= c < count for c in value):
        raise InvalidArgument(f"{what} must hold chunk indices from 0 to {count - 1}")
    return value
