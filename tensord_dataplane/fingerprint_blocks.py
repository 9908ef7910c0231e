"""Fingerprint definition 2 (manifests that say ``fp`` = 2, written before definition 3): a
weighted sum of 256-byte block sums. Kept so versions recorded under it keep verifying; new
versions use `tensord_dataplane.fingerprint_words`. Linear: it misses swapped words inside a
block and compensating changes, which is why it was replaced.

Pad the tensor's L bytes with zeros to a multiple of 256; read each 256-byte block k as 32
little-endian int64 words and take their wrapping sum s_k; the share is sum_k s_k * (2k + G)
mod 2**64 with G = 0x9E3779B97F4A7C15; the fingerprint is share XOR (L * 0xFF51AFD7ED558CCD).
Over a slab: block sums, prefix sums of s and k*s per 1 GiB chunk, differences at each tensor's
bounds, and each tensor's last, partial block read with a byte mask.
"""

from __future__ import annotations

import numpy as np
import torch

from tensord_contract.errors import InvalidArgument

BLOCK_BYTES = 256
_WORDS = BLOCK_BYTES // 8
_MASK = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX = 0xFF51AFD7ED558CCD
_CHUNK_BLOCKS = 1 << 22  # 1 GiB of data per step: bounds the temporary memory to ~100 MB
_G = np.uint64(_GOLDEN)


def _signed(x: int) -> int:
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


def block_part(b: torch.Tensor, start: int, total: int) -> int:
    """The share of bytes ``[start, start + len(b))`` of a `total`-byte tensor (a flat uint8
    tensor `b`). `start` must be a multiple of BLOCK_BYTES, and so must the length unless the
    part ends the tensor. Add the shares (mod 2**64), then `block_finish`."""
    n = b.numel()
    last = start + n == total
    if start % BLOCK_BYTES or (not last and n % BLOCK_BYTES) or start + n > total:
        raise InvalidArgument(f"fingerprint parts must be aligned to {BLOCK_BYTES} bytes")
    first = start // BLOCK_BYTES
    full = n // BLOCK_BYTES
    share = torch.zeros((), dtype=torch.int64, device=b.device)
    for k in range(0, full, _CHUNK_BLOCKS):
        count = min(_CHUNK_BLOCKS, full - k)
        part = b[k * BLOCK_BYTES : (k + count) * BLOCK_BYTES]
        if part.storage_offset() % 8:
            part = part.clone()
        sums = part.view(torch.int64).view(count, _WORDS).sum(1)
        ramp = torch.arange(count, device=b.device, dtype=torch.int64)
        share = share + 2 * (sums * ramp).sum() + sums.sum() * _signed(2 * (first + k) + _GOLDEN)
    rest = n - full * BLOCK_BYTES
    if rest:
        tail = torch.zeros(BLOCK_BYTES, dtype=torch.uint8, device=b.device)
        tail[:rest] = b[full * BLOCK_BYTES :]
        share = share + tail.view(torch.int64).sum() * _signed(2 * (first + full) + _GOLDEN)
    return int(share.item()) & _MASK


def block_finish(share: int, total: int) -> int:
    return ((share & _MASK) ^ (total * _MIX)) & _MASK


def block_slab_fingerprints(buf: torch.Tensor, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The fingerprints (uint64) of tensors at byte `offsets` (multiples of 256) of a flat uint8
    buffer whose length is a multiple of 256, computed in bulk where the buffer lies."""
    n = len(offsets)
    if not n:
        return np.zeros(0, dtype=np.uint64)
    if buf.dim() != 1 or buf.dtype != torch.uint8 or buf.numel() % BLOCK_BYTES or buf.storage_offset() % 8:
        raise InvalidArgument("slab_fingerprints needs a flat, aligned uint8 buffer of whole 256-byte blocks")
    offsets, sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    if np.any(offsets % BLOCK_BYTES) or int((offsets + sizes).max()) > buf.numel() or int(offsets.min()) < 0:
        raise InvalidArgument("tensor offsets must be multiples of 256 inside the buffer")
    words = buf.view(torch.int64)
    first, full, rest = offsets // BLOCK_BYTES, sizes // BLOCK_BYTES, sizes % BLOCK_BYTES
    p0, p1 = _prefix_sums_at(words, np.concatenate([first, first + full]))
    with np.errstate(over="ignore"):
        s = p0[n:] - p0[:n]  # sum of the block sums of each tensor's whole blocks
        ks = p1[n:] - p1[:n]  # the same, each weighted by its global block index
        u_first, u_full = first.astype(np.uint64), full.astype(np.uint64)
        share = np.uint64(2) * ks - (np.uint64(2) * u_first - _G) * s
        partial = rest > 0
        if partial.any():
            tails = _tail_sums(words, first[partial] + full[partial], rest[partial])
            share[partial] += tails * (np.uint64(2) * u_full[partial] + _G)
        return share ^ (sizes.astype(np.uint64) * np.uint64(_MIX))


def _prefix_sums_at(words: torch.Tensor, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each block index x in `at`: (sum of s_k, sum of k * s_k) over blocks k < x."""
    device = words.device
    blocks = words.numel() // _WORDS
    order = np.argsort(at, kind="stable")
    wanted = at[order]
    p0 = torch.zeros(len(at), dtype=torch.int64, device=device)
    p1 = torch.zeros(len(at), dtype=torch.int64, device=device)
    carry0 = torch.zeros((), dtype=torch.int64, device=device)
    carry1 = torch.zeros((), dtype=torch.int64, device=device)
    lo = int(np.searchsorted(wanted, 0, side="right"))  # prefix sums at 0 are 0
    top = int(wanted[-1])
    for c0 in range(0, top, _CHUNK_BLOCKS):
        c1 = min(c0 + _CHUNK_BLOCKS, blocks)
        sums = words[c0 * _WORDS : c1 * _WORDS].view(c1 - c0, _WORDS).sum(1)
        q0 = torch.cumsum(sums, 0)
        q1 = torch.cumsum(sums * torch.arange(c0, c1, device=device, dtype=torch.int64), 0)
        hi = int(np.searchsorted(wanted, c1, side="right"))
        if hi > lo:
            take = torch.from_numpy(wanted[lo:hi] - c0 - 1).to(device)
            into = torch.from_numpy(order[lo:hi]).to(device)
            p0[into] = q0[take] + carry0
            p1[into] = q1[take] + carry1
            lo = hi
        carry0, carry1 = carry0 + q0[-1], carry1 + q1[-1]
    return p0.cpu().numpy().view(np.uint64), p1.cpu().numpy().view(np.uint64)


def _tail_sums(words: torch.Tensor, block: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """The word sum of each given block's first `rest` bytes (the rest masked to zero)."""
    device = words.device
    rows = words.view(-1, _WORDS)[torch.from_numpy(block).to(device)]
    whole = torch.from_numpy(rest // 8).to(device)[:, None]
    bits = torch.from_numpy(8 * (rest % 8)).to(device)[:, None]
    j = torch.arange(_WORDS, device=device)[None, :]
    partial = torch.bitwise_left_shift(torch.ones_like(bits), bits) - 1
    mask = torch.where(j < whole, torch.full_like(partial, -1), torch.where(j == whole, partial, 0))
    return (rows & mask).sum(1).cpu().numpy().view(np.uint64)
