"""Fingerprints of tensors where they lie on a GPU: one Triton kernel over a table of pieces (the
fallback where the PTX kernels of `fingerprint_ptx` do not load; compiled on first use).

Each row of the table is one piece of one tensor (address, whole words, first word or block of
the piece, tensor index, bytes of its last partial word); each program adds its piece's share
to its tensor's slot with one atomic add (shares add up mod 2**64, so the order does not
matter and the result is bit-identical to the CPU's). `words_kernel` computes definition 3
(`fingerprint_words`), `blocks_kernel` definition 2 (`fingerprint_blocks`). Without Triton
both are None. `TRITON_INTERPRET=1` runs them on the CPU, with CPU tensors (tests do).
"""

from __future__ import annotations

from typing import Any

from tensord_dataplane import fingerprint_words as fw

try:
    import triton
    import triton.language as tl
except ImportError:  # no kernels: callers gather and fingerprint with torch
    triton = None


def kernels() -> tuple[Any, Any] | None:
    """(words_kernel, blocks_kernel), or None without Triton."""
    return None if triton is None else (words_kernel, blocks_kernel)


if triton is not None:
    _G, _M1, _M2 = tl.constexpr(fw.G), tl.constexpr(fw.M1), tl.constexpr(fw.M2)

    @triton.jit
    def mixed(x):
        x = (x ^ (x >> 30)) * _M1
        x = (x ^ (x >> 27)) * _M2
        return x ^ (x >> 31)

    @triton.jit
    def words_kernel(rows, shares, PIECE: tl.constexpr, TILE: tl.constexpr):
        """Words [w0, w0 + PIECE) of tensor t: sum of mix(w + (i + 1) * G); the program of the
        first piece adds the last partial word (`rem` bytes after `nwords` words)."""
        row = rows + tl.program_id(0).to(tl.int64) * 5
        address = tl.load(row)
        nwords, w0, t, rem = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
        words = address.to(tl.pointer_type(tl.uint64))
        end = tl.minimum(w0 + PIECE, nwords)
        acc = tl.zeros((TILE,), dtype=tl.uint64)
        for start in range(w0, end, TILE):
            at = start + tl.arange(0, TILE).to(tl.int64)
            inside = at < end
            w = tl.load(words + at, mask=inside, other=0)
            x = mixed(w + (at + 1).to(tl.uint64) * _G)
            acc += tl.where(inside, x, tl.zeros_like(x))
        i = tl.arange(0, 8).to(tl.int64)
        tail_at = address.to(tl.pointer_type(tl.uint8)) + nwords * 8 + i
        tail = tl.load(tail_at, mask=i < tl.where(w0 == 0, rem, 0), other=0)
        word = tl.sum(tail.to(tl.uint64) << (8 * i).to(tl.uint64), axis=0)
        last = mixed(word + (nwords + 1).to(tl.uint64) * _G)
        share = tl.sum(acc, axis=0) + tl.where((rem > 0) & (w0 == 0), last, tl.zeros_like(last))
        tl.atomic_add(shares + t, share.to(tl.int64, bitcast=True))

    @triton.jit
    def blocks_kernel(rows, shares, g, CHUNK: tl.constexpr, TILE: tl.constexpr):
        """Blocks [k0, k0 + CHUNK) of tensor t (definition 2); the first one adds the tensor's
        last partial word (`rem` bytes after `nwords` words)."""
        row = rows + tl.program_id(0).to(tl.int64) * 5
        address = tl.load(row)
        nwords, k0, t, rem = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4)
        words = address.to(tl.pointer_type(tl.int64))
        blocks = tl.minimum((nwords + 31) // 32 - k0, CHUNK)
        acc = tl.zeros((TILE,), dtype=tl.int64)
        for j in range(0, blocks, TILE):
            ks = k0 + j + tl.arange(0, TILE).to(tl.int64)
            at = ks[:, None] * 32 + tl.arange(0, 32).to(tl.int64)[None, :]
            acc += tl.sum(tl.load(words + at, mask=at < nwords, other=0), axis=1) * (2 * ks + g)
        i = tl.arange(0, 8).to(tl.int64)
        tail_at = address.to(tl.pointer_type(tl.uint8)) + nwords * 8 + i
        tail = tl.load(tail_at, mask=i < tl.where(k0 == 0, rem, 0), other=0)
        word = tl.sum(tail.to(tl.int64) << (8 * i), axis=0)
        tl.atomic_add(shares + t, tl.sum(acc, axis=0) + word * (2 * (nwords // 32) + g))
