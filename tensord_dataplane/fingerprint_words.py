"""Fingerprint definition 3: a sum of mixed, position-keyed 64-bit words.

A tensor of L bytes is read as n = ceil(L / 8) little-endian 64-bit words w_0..w_{n-1}, the last
one zero-padded. Its share is sum_i mix(w_i + (i + 1) * G) mod 2**64, i the word's index within
the tensor, G = 0x9E3779B97F4A7C15; mix is splitmix64's finaliser (xor-shift, multiply, three
times). The fingerprint is mix(share XOR (L * K)), K = 0xFF51AFD7ED558CCD. Every word is keyed
by its place and mixed before the sum, so swapped words, rows or blocks, compensating changes
(sign flips, +d/-d) and a changed length are caught except with probability ~2**-64. Shares of
parts of a tensor add up (mod 2**64), so parts are fingerprinted apart (ingest) and summed.

In bulk: words are processed a chunk at a time (numpy on the CPU, in cache; torch on a GPU);
each chunk holds pieces of one or many tensors, keyed through one repeated per-tensor constant,
and a cumulative sum splits the mixed words back into tensors. No Python loop per tensor.
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
_CPU_CHUNK = 1 << 16  # words (512 KiB): the chunk and its temporaries stay in cache
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
    `first` of its tensor: `segment_shares` of one run without its planning (small parts)."""
    total = 0
    for c0 in range(0, len(words), _CPU_CHUNK):
        top = min(_CPU_CHUNK, len(words) - c0)
        keyed, scratch = _scratch(top)
        np.add(_ramp(top), words[c0 : c0 + top], out=keyed)
        keyed += _U(((first + c0 + 1) * G) & _MASK)
        total += int(mix_np(keyed, scratch).sum(dtype=_U))
    return total & _MASK


def segment_shares(
    words: Any, starts: np.ndarray, counts: np.ndarray, first: np.ndarray, *, threads: int = 1
) -> np.ndarray:
    """The shares (uint64) of runs of whole words: run r is words[starts[r] : starts[r] +
    counts[r]], its first word at index first[r] of its tensor. Runs must not overlap. `words`
    is a flat uint64 numpy array (chunks spread over `threads` threads when there are many) or
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
    on_torch = isinstance(words, torch.Tensor)
    step = _GPU_CHUNK if on_torch and words.device.type != "cpu" else _CPU_CHUNK
    plan: list[tuple[int, int, tuple[Any, ...]]] = []  # (first run, end run, _chunk's arguments)
    i, c0, n = 0, int(s[0]), len(s)
    while i < n:
        c0 = max(c0, int(s[i]))
        c1 = c0 + step
        hi = int(np.searchsorted(s, c1, side="left"))
        cs, ce = np.maximum(s[i:hi], c0) - c0, np.minimum(e[i:hi], c1) - c0
        plan.append((i, hi, (words, c0, cs, ce, key[i:hi], signed(c0 * G), on_torch)))
        i = int(np.searchsorted(e, c1, side="right"))
        c0 = c1
    if threads > 1 and not on_torch and len(plan) >= 4 * threads:  # numpy releases the GIL
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda p: _chunk(*p[2]), plan))
    else:
        results = [_chunk(*p[2]) for p in plan]
    for (lo, hi, _), values in zip(plan, results, strict=True):  # one transfer per chunk at the end
        v = values.cpu().numpy().view(_U) if on_torch else values
        with np.errstate(over="ignore"):
            out[order[lo:hi]] += v
    return out


def _chunk(words: Any, c0: int, cs: np.ndarray, ce: np.ndarray, key: np.ndarray, base: int, on_torch: bool) -> Any:
    """The mixed-word sums of the runs [cs, ce) (relative to c0) of one chunk."""
    top = int(ce[-1])
    pieces = np.empty(2 * len(cs), dtype=np.int64)  # gap before each run, then the run
    pieces[0::2] = cs - np.concatenate([[0], ce[:-1]])
    pieces[1::2] = ce - cs
    consts = np.zeros(2 * len(cs), dtype=_U)
    with np.errstate(over="ignore"):
        consts[1::2] = key + _U(base & _MASK)
    one = len(cs) == 1 and cs[0] == 0
    if on_torch:
        device = words.device
        x = torch.arange(top, device=device, dtype=torch.int64) * signed(G)
        x += words[c0 : c0 + top]
        if one:
            x += signed(int(consts[1]))
            return mix_torch(x).sum().reshape(1)
        x += torch.repeat_interleave(
            torch.from_numpy(consts.view(np.int64)).to(device), torch.from_numpy(pieces).to(device), output_size=top
        )
        cum = torch.cumsum(mix_torch(x), 0)
        at_end = cum[torch.from_numpy(ce - 1).to(device)]
        before = torch.from_numpy(cs - 1).to(device)
        return at_end - torch.where(before >= 0, cum[before.clamp(min=0)], 0)
    keyed, scratch = _scratch(top)
    with np.errstate(over="ignore"):
        np.add(_ramp(top), words[c0 : c0 + top], out=keyed)
        if one:
            keyed += consts[1]
            return np.array([mix_np(keyed, scratch).sum(dtype=_U)], dtype=_U)
        keyed += np.repeat(consts, pieces)
        sums = np.cumsum(mix_np(keyed, scratch), dtype=_U)
        return sums[ce - 1] - np.where(cs > 0, sums[np.maximum(cs - 1, 0)], _U(0))


_ramps: list[np.ndarray] = []
_buffers = threading.local()  # two chunk-sized buffers per thread (ingest hashes on many)


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    found = getattr(_buffers, "pair", None)
    if found is None:
        found = _buffers.pair = (np.empty(_CPU_CHUNK, dtype=_U), np.empty(_CPU_CHUNK, dtype=_U))
    return found[0][:n], found[1][:n]


def _ramp(n: int) -> np.ndarray:
    """(0..n-1) * G mod 2**64 (uint64), from a cached ramp of one chunk."""
    if not _ramps:
        with np.errstate(over="ignore"):
            _ramps.append(np.arange(_CPU_CHUNK, dtype=_U) * _U(G))
    return _ramps[0][:n]
