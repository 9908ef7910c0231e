"""Where many tensors' bytes lie and how they are laid out, taken and compared in bulk.

A copy plan (`sdk.plans`) made for some tensors stays right exactly as long as every tensor
still has the same data pointer, shape, contiguity and dtype (a plan is kept only for dense
tensors, whose bytes the shape then lays out): then a plan made afresh would be the same plan.
The pointer names the device (with unified addressing no two devices' memory share an address;
empty tensors, which copy nothing, may all have 0). A tensor re-allocated (`.to()`, `resize_`,
`set_`, `param.data = ...`), reshaped in place, or replaced in its mapping by another (even one
at the same address: then the plan is still right for it, unless its shape, layout or dtype
differ) changes the snapshot. It is taken by one C-level `map` per attribute (four), not a
Python pass per tensor, yet that is still four calls into torch per tensor: 0.7-0.8x of what
`describe` costs (`benchmarks/plans.py`: 291 vs 412 ms at 90k tensors on the shared 2-core VM).

Conjugate and negative views carry bits the bytes do not show: those are compared for rows
of complex dtype (the only ones `Tensor.conj()` marks); a tensor made by the private
`torch._neg_view` of a real dtype is not told apart.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensord_contract.bulk import paused_gc

_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_BITS = operator.methodcaller("is_conj")
_NEG = operator.methodcaller("is_neg")


@dataclass(frozen=True, eq=False)
class Snapshot:
    ptrs: np.ndarray
    shapes: list[torch.Size]
    contiguous: list[bool]  # with the shape, the layout of the bytes (strides of size-1 dims aside)
    dtypes: list[torch.dtype]
    bits: list[tuple[bool, bool]]  # (conj, neg) of the rows of complex dtype, in order

    @classmethod
    def take(cls, values: Sequence[Any]) -> Snapshot | None:
        """The snapshot of `values`; None when one is not a strided tensor (`describe` then
        says which and why)."""
        with paused_gc():
            try:
                ptrs = np.fromiter(map(torch.Tensor.data_ptr, values), dtype=np.int64, count=len(values))
                shapes = list(map(_SHAPE, values))
                contiguous = list(map(torch.Tensor.is_contiguous, values))
                dtypes = list(map(_DTYPE, values))
            except (TypeError, RuntimeError):  # not a tensor; sparse, nested, ...
                return None
            bits: list[tuple[bool, bool]] = []
            if any(d.is_complex for d in set(dtypes)):
                rows = [t for t, d in zip(values, dtypes, strict=True) if d.is_complex]
                bits = list(zip(map(_BITS, rows), map(_NEG, rows), strict=True))
        return cls(ptrs, shapes, contiguous, dtypes, bits)

    def same(self, other: Snapshot | None) -> bool:
        """Every tensor where and as it was."""
        return (
            other is not None
            and np.array_equal(self.ptrs, other.ptrs)
            and self.shapes == other.shapes
            and self.contiguous == other.contiguous
            and self.dtypes == other.dtypes
            and self.bits == other.bits
        )
