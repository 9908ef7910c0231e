"""Test data made here: random bits of any dtype."""

from __future__ import annotations

import torch

from tensord_dataplane.tensors import as_bytes


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (NaN payloads, subnormals, every bit pattern);
    bools are 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=dtype)
    b = as_bytes(t)
    b.copy_(torch.randint(0, 256, (b.numel(),), dtype=torch.uint8, generator=g))
    if dtype == torch.bool:
        b.bitwise_and_(1)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality of dtype, shape and bytes (NaN payloads included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(as_bytes(a.cpu().contiguous()), as_bytes(b.cpu().contiguous()))
    )
