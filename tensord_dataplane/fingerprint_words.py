"""Fingerprint definition 3: a sum of mixed, position-keyed 64-bit words.

A tensor of L bytes is read as n = ceil(L / 8) little-endian 64-bit words w_0..w_{n-1}, the last
one zero-padded. Its share is sum_i mix(w_i + (i + 1) * G) mod 2**64, i the word's index within
the tensor, G = 0x9E3779B97F4A7C15; mix is splitmix64's finaliser (xor-shift, multiply, three
times). The fingerprint is mix(share XOR (L * K)), K = 0xFF51AFD7ED558CCD. Every word is keyed
by its place and mixed before the sum, so swapped words, rows or blocks, compensating changes
(sign flips, +d/-d) and a changed length are caught except with probability ~2**-64. Shares of
parts of a tensor add up (mod 2**64), so parts are fingerprinted apart (ingest) and summed.

In bulk on the CPU (numpy; its ufuncs release the GIL): long runs of words are mixed 128 Ki
words (1 MiB) at a time in two per-thread buffers, every pass in place (`out=`); short runs
(small tensors) are mixed several to such a span, keyed through one repeated per-run constant,
and summed per run by np.add.reduceat. The work is cut into items of up to 16 MiB spread over
a thread pool. On a GPU, torch chunk by chunk (a cumulative sum splits the mixed words back into
tensors). No Python loop per tensor.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

G = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
K = 0xFF51AFD7ED558CCD
_MASK = 2**64 - 1
_U = np.uint64
_S30, _S27, _S31, _M1, _M2 = _U(30), _U(27), _U(31), _U(M1), _U(M2)
_CPU_CHUNK = 1 << 17  # words (1 MiB) per ufunc call: on one thread as fast as 32 Ki, 1/4 the GIL per byte
_PIECE = 1 << 21  # words (16 MiB): about what one CPU work item (one thread at a time) covers
_SHORT = _CPU_CHUNK // 2  # runs shorter than this are mixed several to a span
_SPAN = _CPU_CHUNK  # words: a span of short runs mixed together
_GPU_CHUNK = 1 << 22  # words (32 MiB): a few temporaries of this size per step


def signed(x: int) -> int:
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


def mix(x: int) -> int:
    """splitmix64's finaliser of one 64-bit value (the reference the bulk paths match)."""
    x &= _MASK
    x = ((x ^ (x >> 30)) * M1) & _MASK
    x = ((x ^ (x >> 27)) * M2) & _MASK
    return x ^ (x >> 31)


def mix_np(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """mix, in place over a uint64 array (`y`: scratch of the same size)."""
    y = np.empty_like(x) if y is None else y
    with np.errstate(over="ignore"):
        np.right_shift(x, _U(30), out=y)
        x ^= y
        x *= _U(M1)
        np.right_shift(x, _U(27), out=y)
        x ^= y
        x *= _U(M2)
        np.right_shift(x, _U(31), out=y)
        x ^= y
    return x


def mix_torch(x: torch.Tensor) -> torch.Tensor:
    """mix, in place over an int64 tensor (torch's >> is arithmetic: mask after shifting)."""
    for shift, factor in ((30, M1), (27, M2), (31, 0)):
        x ^= torch.bitwise_right_shift(x, shift) & ((1 << (64 - shift)) - 1)
        if factor:
            x *= signed(factor)
    return x


def finish(shares: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Fingerprints (uint64) from complete shares and byte lengths."""
    with np.errstate(over="ignore"):
        x = np.asarray(shares, dtype=_U) ^ (np.asarray(sizes).astype(_U) * _U(K))
    return mix_np(x)


def tail_shares(tails: np.ndarray, positions: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """The shares of last partial words: `tails` (uint64 as read), their index in the tensor and
    the bytes of them that belong to it (1..7); the others are zeroed."""
    mask = (_U(1) << (rest.astype(_U) * _U(8))) - _U(1)
    with np.errstate(over="ignore"):
        x = (np.asarray(tails, dtype=_U) & mask) + (positions.astype(_U) + _U(1)) * _U(G)
    return mix_np(x)


def run_share(words: np.ndarray, first: int) -> int:
    """The share of one run of whole words (uint64, on the CPU), its first word at index
    `first` of its tensor, on this thread (what ingest's readers compute per chunk)."""
    return _run_sum(words, ((first + 1) * G) & _MASK) & _MASK


def _run_sum(words: np.ndarray, key: int) -> int:
    """sum_j mix(words[j] + j * G + key), not reduced mod 2**64: chunk by chunk in this thread's
    two cache-sized buffers, every pass in place (`out=`), no temporaries."""
    total, n = 0, len(words)
    if not n:
        return 0
    add, reduce_ = np.add, np.add.reduce
    with np.errstate(over="ignore"):
        for c0 in range(0, n, _CPU_CHUNK):
            top = min(_CPU_CHUNK, n - c0)
            x, y = _scratch(top)
            add(_ramp(top), words[c0 : c0 + top], out=x)
            add(x, _U((key + c0 * G) & _MASK), out=x)
            total += int(reduce_(_mix_into(x, y)))
    return total


def _mix_into(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """mix_np with the ufuncs called directly (the same passes, less dispatch per chunk)."""
    rs, xor, mul = np.right_shift, np.bitwise_xor, np.multiply
    rs(x, _S30, out=y)
    xor(x, y, out=x)
    mul(x, _M1, out=x)
    rs(x, _S27, out=y)
    xor(x, y, out=x)
    mul(x, _M2, out=x)
    rs(x, _S31, out=y)
    return xor(x, y, out=x)


def segment_shares(
    words: Any, starts: np.ndarray, counts: np.ndarray, first: np.ndarray, *, threads: int = 1
) -> np.ndarray:
    """The shares (uint64) of runs of whole words: run r is words[starts[r] : starts[r] +
    counts[r]], its first word at index first[r] of its tensor. Runs must not overlap. `words`
    is a flat uint64 numpy array (work spread over `threads` threads when there is enough) or
    a flat int64 torch tensor (on any device)."""
    out = np.zeros(len(starts), dtype=_U)
    live = np.flatnonzero(counts > 0)
    if not len(live):
        return out
    order = live[np.argsort(starts[live], kind="stable")]
    s, c = starts[order].astype(np.int64), counts[order].astype(np.int64)
    e = s + c
    if np.any(s[1:] < e[:-1]):
        raise ValueError("fingerprint runs overlap")
    with np.errstate(over="ignore"):
        key = (first[order].astype(_U) - s.astype(_U) + _U(1)) * _U(G)
    if isinstance(words, torch.Tensor):
        return _torch_shares(words, out, order, s, e, key)
    piece = _piece_size(int(c.sum()), threads)
    long = c >= _SHORT
    with np.errstate(over="ignore"):  # a long run is handed over as its own slice: keyed from 0
        long_key = key[long] + s[long].astype(_U) * _U(G)
    items = _run_items(
        [words[x:y] for x, y in zip(s[long].tolist(), e[long].tolist(), strict=True)], order[long], long_key, piece
    )
    short = ~long
    if short.any():  # short runs: several to a span, mixed in one pass
        ss, se, sk, sr = s[short], e[short], key[short], order[short]
        group = np.cumsum(se - ss) // piece
        for idx in np.split(np.arange(len(ss)), np.flatnonzero(np.diff(group)) + 1):
            items.append(("batch", sr[idx], (words, ss[idx], se[idx], sk[idx])))
    return _run(items, out, threads)


def array_shares(arrays: list[np.ndarray], *, threads: int = 1) -> np.ndarray:
    """The shares (uint64) of whole-word arrays (uint64, on the CPU), each a tensor's words from
    its first: the arrays are read where they lie (no gather), spread over `threads` threads."""
    out = np.zeros(len(arrays), dtype=_U)
    piece = _piece_size(sum(len(x) for x in arrays), threads)
    keys = np.full(len(arrays), _U(G), dtype=_U)
    return _run(_run_items(arrays, np.arange(len(arrays)), keys, piece), out, threads)


def _piece_size(words: int, threads: int) -> int:
    """Words a work item covers: about _PIECE, less where that would leave threads idle."""
    return int(min(_PIECE, max(_CPU_CHUNK, words // (4 * max(threads, 1)))))


# CPU work items, each (kind, rows, what), one thread each; its values add to out[rows]:
#   ("runs", rows, [(words, key), ...]): pieces of long runs, each mixed a chunk at a time;
#   ("batch", rows, (words, s, e, key)): short runs [s, e) of words, mixed a span at a time.
def _run_items(runs: list[np.ndarray], rows: np.ndarray, key: np.ndarray, piece: int) -> list[tuple[Any, ...]]:
    """Items over the long runs `runs` (key: (index of the run's first word in its tensor + 1) * G;
    a piece at offset a of its run is keyed key + a * G): pieces of at most `piece` words,
    consecutive pieces together until an item holds about `piece` words."""
    items: list[tuple[Any, ...]] = []
    pending: list[tuple[np.ndarray, int]] = []
    pending_rows: list[int] = []
    size = 0
    for r, words, k in zip(rows.tolist(), runs, key.tolist(), strict=True):
        for a in range(0, len(words), piece):
            pending.append((words[a : a + piece], (k + a * G) & _MASK))
            pending_rows.append(r)
            size += min(piece, len(words) - a)
            if size >= piece:
                items.append(("runs", np.array(pending_rows), pending))
                pending, pending_rows, size = [], [], 0
    if pending:
        items.append(("runs", np.array(pending_rows), pending))
    return items


def _run(items: list[tuple[Any, ...]], out: np.ndarray, threads: int) -> np.ndarray:
    if threads > 1 and len(items) > 1:  # numpy's ufuncs release the GIL
        with ThreadPoolExecutor(min(threads, len(items))) as pool:
            results = list(pool.map(_work, items))
    else:
        results = [_work(item) for item in items]
    for (_, rows, _), values in zip(items, results, strict=True):
        with np.errstate(over="ignore"):
            np.add.at(out, rows, values)
    return out


def _work(item: tuple[Any, ...]) -> np.ndarray:
    kind, _, what = item
    if kind == "runs":
        return np.array([_run_sum(words, k) & _MASK for words, k in what], dtype=_U)
    words, s, e, key = what
    values = np.empty(len(s), dtype=_U)
    i, n = 0, len(s)
    while i < n:  # spans of at most _SPAN words of short runs (and the gaps between)
        hi = max(i + 1, int(np.searchsorted(e, s[i] + _SPAN, side="right")))
        values[i:hi] = _batch(words, s[i:hi], e[i:hi], key[i:hi])
        i = hi
    return values


def _batch(words: np.ndarray, s: np.ndarray, e: np.ndarray, key: np.ndarray) -> np.ndarray:
    """The mixed-word sums of short runs [s, e) lying within _SPAN words of s[0]: one pass of
    each step over the span (gaps included), keyed per run, summed per run by np.add.reduceat."""
    c0 = int(s[0])
    top = int(e[-1]) - c0
    cs, ce = s - c0, e - c0
    pieces = np.empty(2 * len(cs), dtype=np.int64)  # the run, then the gap after it
    pieces[0::2] = ce - cs
    pieces[1:-1:2] = cs[1:] - ce[:-1]
    pieces[-1] = 0
    consts = np.zeros(2 * len(cs), dtype=_U)
    x, y = _scratch(top)
    with np.errstate(over="ignore"):
        consts[0::2] = key + _U((c0 * G) & _MASK)
        np.add(_ramp(top), words[c0 : c0 + top], out=x)
        np.add(x, np.repeat(consts, pieces), out=x)
        bounds = np.empty(2 * len(cs) - 1, dtype=np.int64)
        bounds[0::2] = cs
        bounds[1::2] = ce[:-1]
        return np.add.reduceat(_mix_into(x, y), bounds)[0::2]


def _torch_shares(
    words: torch.Tensor, out: np.ndarray, order: np.ndarray, s: np.ndarray, e: np.ndarray, key: np.ndarray
) -> np.ndarray:
    """segment_shares over torch words (a GPU's, or CPU tensors in tests): chunk by chunk."""
    step = _GPU_CHUNK if words.device.type != "cpu" else _CPU_CHUNK
    plan: list[tuple[int, int, tuple[Any, ...]]] = []  # (first run, end run, _chunk's arguments)
    i, c0, n = 0, int(s[0]), len(s)
    while i < n:
        c0 = max(c0, int(s[i]))
        c1 = c0 + step
        hi = int(np.searchsorted(s, c1, side="left"))
        cs, ce = np.maximum(s[i:hi], c0) - c0, np.minimum(e[i:hi], c1) - c0
        plan.append((i, hi, (words, c0, cs, ce, key[i:hi], signed(c0 * G))))
        i = int(np.searchsorted(e, c1, side="right"))
        c0 = c1
    results = [_chunk(*p[2]) for p in plan]
    for (lo, hi, _), values in zip(plan, results, strict=True):  # one transfer per chunk at the end
        v = values.cpu().numpy().view(_U)
        with np.errstate(over="ignore"):
            out[order[lo:hi]] += v
    return out


def _chunk(words: torch.Tensor, c0: int, cs: np.ndarray, ce: np.ndarray, key: np.ndarray, base: int) -> torch.Tensor:
    """The mixed-word sums of the runs [cs, ce) (relative to c0) of one chunk of torch words."""
    top = int(ce[-1])
    pieces = np.empty(2 * len(cs), dtype=np.int64)  # gap before each run, then the run
    pieces[0::2] = cs - np.concatenate([[0], ce[:-1]])
    pieces[1::2] = ce - cs
    consts = np.zeros(2 * len(cs), dtype=_U)
    with np.errstate(over="ignore"):
        consts[1::2] = key + _U(base & _MASK)
    device = words.device
    x = torch.arange(top, device=device, dtype=torch.int64) * signed(G)
    x += words[c0 : c0 + top]
    if len(cs) == 1 and cs[0] == 0:
        x += signed(int(consts[1]))
        return mix_torch(x).sum().reshape(1)
    x += torch.repeat_interleave(
        torch.from_numpy(consts.view(np.int64)).to(device), torch.from_numpy(pieces).to(device), output_size=top
    )
    cum = torch.cumsum(mix_torch(x), 0)
    at_end = cum[torch.from_numpy(ce - 1).to(device)]
    before = torch.from_numpy(cs - 1).to(device)
    return at_end - torch.where(before >= 0, cum[before.clamp(min=0)], 0)


_ramps: list[np.ndarray] = []
_buffers = threading.local()  # two span-sized buffers per thread (ingest hashes on many)


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    found = getattr(_buffers, "pair", None)
    if found is None:
        size = max(_CPU_CHUNK, _SPAN)
        found = _buffers.pair = (np.empty(size, dtype=_U), np.empty(size, dtype=_U))
    return found[0][:n], found[1][:n]


def _ramp(n: int) -> np.ndarray:
    """(0..n-1) * G mod 2**64 (uint64), from one cached ramp of a span."""
    if not _ramps:
        with np.errstate(over="ignore"):
            _ramps.append(np.arange(max(_CPU_CHUNK, _SPAN), dtype=_U) * _U(G))
    return _ramps[0][:n]
