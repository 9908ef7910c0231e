"""Where many tensors' bytes lie and how they are laid out, taken and checked in bulk.

A copy plan (`sdk.plans`) made for some tensors stays right exactly as long as every tensor
still has the same data pointer, shape, contiguity and dtype (a plan is kept only for dense
tensors, whose bytes the shape then lays out): then a plan made afresh would be the same plan.
The pointer names the device (with unified addressing no two devices' memory share an address;
empty tensors, which copy nothing, may all have 0). A tensor re-allocated (`.to()`, `resize_`,
`set_`, `param.data = ...`), reshaped in place, or replaced in its mapping by another (even one
at the same address: then the plan is still right for it, unless its shape, layout or dtype
differ) changes the snapshot.

`take` reads the columns a plan is made from by one C-level `map` per attribute (four calls
into torch per tensor). `holds` checks a kept snapshot against the tensors of a later call with
fewer: the data pointers (one call per tensor) and torch's own C++ tensor guard (the one
`torch.compile` checks its graphs' inputs with: Python type, dispatch keys, dtype, device,
sizes and strides, for every tensor in one call; it holds no tensor). The guard is stricter
than the columns (strides, not contiguity; the type): a tensor it rejects only makes a new
plan. Where torch has no such guard, `holds` takes and compares the columns.

Conjugate and negative views carry bits the bytes do not show: those are compared for rows
of complex dtype (the only ones `Tensor.conj()` marks); the guard sees them as dispatch keys
(without it, a tensor made by the private `torch._neg_view` of a real dtype is not told apart).
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Iterator, Sequence
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
    guard: Any = None  # torch's tensor guard over the tensors, where torch has one

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
            return cls(ptrs, shapes, contiguous, dtypes, bits, _guard(values))

    def holds(self, values: Sequence[Any]) -> bool:
        """`values` are the tensors this was taken of, every one where and as it was."""
        if len(values) != len(self.ptrs):
            return False
        if self.guard is None:
            return self.same(Snapshot.take(values))
        with paused_gc():
            try:
                with _one_mode():
                    if not self.guard.check(*values):
                        return False
                ptrs = np.fromiter(map(torch.Tensor.data_ptr, values), dtype=np.int64, count=len(values))
            except (TypeError, RuntimeError):
                return False
        return bool(np.array_equal(ptrs, self.ptrs))

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


def _guard(values: Sequence[Any]) -> Any:
    """torch's C++ guard over `values` (sizes and strides exact), or None where torch lacks it
    or its guard does not tell the shapes, strides and dtypes `holds` needs told apart."""
    guards = _tensor_guards()
    if guards is None:
        return None
    try:
        with _one_mode():
            return guards(*values, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except (TypeError, RuntimeError):
        return None


@contextlib.contextmanager
def _one_mode() -> Iterator[None]:
    """The guard records the thread's autograd and inference modes with each tensor's dispatch
    keys: made and checked in one fixed mode, a plan made under `inference_mode` (an engine)
    still holds when checked outside it."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


@functools.cache
def _tensor_guards() -> Any:
    """torch's private `TensorGuards`, once it has been seen to reject what it must (a private
    API: a torch whose guard treats sizes as dynamic, or has none, gets the columns)."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        probe = torch.zeros(2, 3)
        guard = TensorGuards(probe, dynamic_dims_sizes=None, dynamic_dims_strides=None)  # type: ignore[misc, arg-type]  # the stub omits the tensors
        others = (torch.zeros(3, 2), probe.t(), probe.view(torch.int32), probe[:, :2], torch.nn.Parameter(probe))
        if guard.check(probe) and not any(guard.check(t) for t in others):
            return TensorGuards
    except (ImportError, AttributeError, TypeError, RuntimeError):
        pass
    return None
