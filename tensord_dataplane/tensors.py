"""torch helpers shared by the SDK and the daemon: dtype names and codes, byte views, and the
description of many tensors in one pass."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter

import numpy as np
import torch

from tensord_contract.bulk import paused_gc
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import DTYPE_CODE, DTYPE_SIZES, Table
from tensord_dataplane.snapshot import Snapshot

_DTYPE, _SHAPE, _DEVICE = attrgetter("dtype"), attrgetter("shape"), attrgetter("device")
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in DTYPE_SIZES if isinstance(getattr(torch, name, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
#: torch dtype -> its code on the wire (`tensord_contract.manifest.DTYPE_CODES`)
CODES: dict[torch.dtype, int] = {dtype: DTYPE_CODE[name] for name, dtype in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} is not supported by tensord") from None


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"dtype {name!r} is not available in this torch build") from None


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (any dtype, 0-d and empty included)."""
    if not t.is_contiguous():
        raise InvalidArgument("as_bytes needs a contiguous tensor")
    nbytes = t.numel() * t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (nbytes,), (1,))


@functools.lru_cache(maxsize=4096)
def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


@dataclass
class Described:
    """Many tensors described in one pass: their table columns and where their bytes are.

    ``ptrs[i]`` holds ``sizes[i]`` bytes of ``tensors[i]`` when ``dense[i]``. With
    ``copy_sparse`` a tensor that is not dense (non-contiguous, or a conjugate or negative
    view) is replaced in ``tensors`` by a dense copy, so that every row is dense.
    """

    tensors: list[torch.Tensor]
    dtypes: np.ndarray  # uint8 wire codes
    ndims: np.ndarray
    dims: np.ndarray
    ptrs: np.ndarray  # int64
    sizes: np.ndarray  # int64 bytes
    devices: list[torch.device]  # per tensor
    dense: np.ndarray  # bool

    def by_device(self, rows: np.ndarray | None = None) -> dict[torch.device, np.ndarray]:
        """device -> the rows on it (of `rows`, default all)."""
        every = np.arange(len(self.devices)) if rows is None else rows
        distinct = set(self.devices)
        if len(distinct) <= 1:
            return {distinct.pop(): every} if distinct and len(every) else {}
        out: dict[torch.device, list[int]] = {}
        for i in every.tolist():
            out.setdefault(self.devices[i], []).append(i)
        return {d: np.array(r, dtype=np.int64) for d, r in out.items()}


def describe(
    values: Iterable[object], what: str = "tensors", *, copy_sparse: bool = True, known: Snapshot | None = None
) -> Described:
    """Describe tensors in bulk (the collector paused): InvalidArgument for anything that is not
    a strided tensor of a supported dtype on a CPU or CUDA device. `known`: a snapshot of these
    very tensors, taken just before (its pointers, shapes and dtypes are not asked again)."""
    with paused_gc():
        given = list(values)
        if not all(map(isinstance, given, repeat(torch.Tensor))):
            bad = next(t for t in given if not isinstance(t, torch.Tensor))
            raise InvalidArgument(f"{what} must be torch.Tensor, not {type(bad).__name__}")
        try:
            return _describe(given, what, copy_sparse, known)  # type: ignore[arg-type]
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as exc:  # sparse, nested, ...: no plain memory to copy
            raise InvalidArgument(f"{what} must be dense (strided) tensors: {exc}") from None


def _describe(tensors: list[torch.Tensor], what: str, copy_sparse: bool, known: Snapshot | None) -> Described:
    """`describe` past its type check (its errors from torch are raised there as InvalidArgument)."""
    codes = list(map(CODES.get, known.dtypes if known is not None else map(_DTYPE, tensors)))
    if None in codes:
        bad_dtype = next(t.dtype for t, c in zip(tensors, codes, strict=True) if c is None)
        raise InvalidArgument(f"dtype {bad_dtype} is not supported by tensord")
    dense = list(known.contiguous if known is not None else map(torch.Tensor.is_contiguous, tensors))
    views = list(map(torch.Tensor._is_view, tensors))
    if any(views):  # only views carry the conjugate and negative bits (their bytes are not the values)
        for i in [i for i, v in enumerate(views) if v]:
            dense[i] = dense[i] and not tensors[i].is_conj() and not tensors[i].is_neg()
    if copy_sparse and not all(dense):
        known = None  # some are replaced by dense copies
        tensors = [
            t if ok else t.resolve_conj().resolve_neg().contiguous() for t, ok in zip(tensors, dense, strict=True)
        ]
    shapes = known.shapes if known is not None else list(map(_SHAPE, tensors))
    devices = list(map(_DEVICE, tensors))
    if any(d.type not in ("cpu", "cuda") for d in set(devices)):
        raise InvalidArgument(f"{what} must lie on cpu or cuda devices, not {sorted(map(str, set(devices)))}")
    ptrs = (
        known.ptrs
        if known is not None
        else np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors))
    )
    ndims = np.fromiter(map(len, shapes), dtype=np.uint8, count=len(shapes))
    dims = np.fromiter(chain.from_iterable(shapes), dtype=np.int64, count=int(ndims.sum()))
    dtypes = np.array(codes, dtype=np.uint8)
    sizes = Table(names=[], dtypes=dtypes, ndims=ndims, dims=dims).sizes  # numel x itemsize, vectorised
    flags = np.ones(len(tensors), dtype=bool) if copy_sparse else np.array(dense, dtype=bool)
    return Described(tensors, dtypes, ndims, dims, ptrs, sizes, devices, flags)
