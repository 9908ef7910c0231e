"""Many small pieces of a peer's memory read with few engine entries: spans and windows.

An engine entry costs something besides its bytes: over TCP ~37 us (the VM), over
`nvlink_intra` a fetch of the peer's whole description of its memory while Mooncake's metadata
cache is off (see `transport/mooncake.py`). A publication's pieces lie where its publisher's
tensors lie, one per tensor, so reading 90k tensors one entry each costs far more than the
bytes. `Spans` groups the small pieces (under `gap` bytes) into spans of the peer's memory:
neighbours within one registration (`fence`) and closer than `gap` bytes share a span, which is
read whole (the bytes between them too, never past the registration) into a staging buffer,
and the batched local copy scatters the pieces to their places. Pieces of `gap` bytes or more
go straight to their place, one entry each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tensord_dataplane.copy import windows


@dataclass(frozen=True)
class Window:
    """One staged read: engine entries (offset in the staging window, peer address, bytes,
    registration), then a local scatter (piece index, offset in the window, bytes)."""

    at: np.ndarray
    remote: np.ndarray
    length: np.ndarray
    fence: np.ndarray
    pieces: np.ndarray
    rel: np.ndarray
    n: np.ndarray


@dataclass(frozen=True)
class Spans:
    """How to read pieces (peer address `src`, `n` bytes, registration `fence`): `direct`
    pieces one entry each, the rest through staging windows of at most `size` bytes."""

    direct: np.ndarray
    windows: list[Window]
    size: int

    @classmethod
    def of(cls, src: np.ndarray, n: np.ndarray, fence: np.ndarray, gap: int, limit: int) -> Spans:
        small = np.flatnonzero(n < gap) if gap > 0 else np.zeros(0, dtype=np.int64)
        direct = np.flatnonzero(n >= gap) if gap > 0 else np.arange(len(n))
        if len(small) < 2:
            return cls(np.arange(len(n)), [], 0)
        order = small[np.argsort(src[small], kind="stable")]
        s, e, f = src[order], src[order] + n[order], fence[order]
        top = np.maximum.accumulate(e)  # pieces may overlap (tied weights)
        new = np.ones(len(s), dtype=bool)
        new[1:] = (f[1:] != f[:-1]) | (s[1:] - top[:-1] > gap)
        _cap(new, s, top, limit)
        first = np.flatnonzero(new)
        if 2 * len(first) > len(s):  # spans would not halve the entries: not worth a local copy
            return cls(np.arange(len(n)), [], 0)
        span = np.cumsum(new) - 1
        starts, stops = s[first], np.maximum.reduceat(e, first)
        lengths = stops - starts
        packed = np.cumsum(lengths) - lengths  # each span's place in the staged stream
        out: list[Window] = []
        size = 0
        for idx, lo, hi in windows(packed, lengths, limit):
            size = max(size, hi - lo)
            a, b = int(first[idx[0]]), int(first[idx[-1] + 1]) if idx[-1] + 1 < len(first) else len(s)
            k = np.arange(a, b)
            cols = (
                packed[idx] - lo,
                starts[idx],
                lengths[idx],
                f[first[idx]],
                order[k],
                packed[span[k]] - lo + (s[k] - starts[span[k]]),
                e[k] - s[k],
            )
            for c in cols:
                c.flags.writeable = False  # the batched copy keeps a table for read-only columns
            out.append(Window(*cols))
        return cls(direct, out, size)


def _cap(new: np.ndarray, s: np.ndarray, top: np.ndarray, limit: int) -> None:
    """Start new spans (at piece starts) so that none is much longer than `limit` bytes."""
    first = np.flatnonzero(new)
    stops = np.append(first[1:], len(s))
    long = top[stops - 1] - s[first] > limit
    for a, b in zip(first[long].tolist(), stops[long].tolist(), strict=True):
        cur = a
        while top[b - 1] - s[cur] > limit:
            j = cur + int(np.searchsorted(top[cur:b], s[cur] + limit, "right"))
            j = max(j, cur + 1)
            if j >= b:
                break
            new[j] = True
            cur = j
