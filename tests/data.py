"""Test data made here: random bits of any dtype."""

from __future__ import annotations

import torch

from sdk.tensors import as_bytes


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
