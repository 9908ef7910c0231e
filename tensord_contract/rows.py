"""A tensor table read as ``name -> {dtype, shape, nbytes}`` (what ``info(tensors=True)``
returns), decoded from the wire's columns without numpy and each row built only when asked
for: a caller that looks up a few names of a 90k-tensor set never pays for 90k dicts."""

from __future__ import annotations

import array
import itertools
import math
import sys
from collections.abc import ItemsView, Iterator, Mapping, ValuesView
from functools import cached_property
from typing import Any

from tensord_contract.bulk import paused_gc
from tensord_contract.dtypes import DTYPE_CODES, DTYPE_SIZES
from tensord_contract.errors import ProtocolError

_ITEMSIZE = [DTYPE_SIZES[d] for d in DTYPE_CODES]


class TensorRows(Mapping[str, dict[str, Any]]):
    """Read-only ``name -> {"dtype", "shape", "nbytes"}`` over a table's wire columns (count,
    names, dtypes, ndims, dims); each row a new dict. Columns that disagree raise ProtocolError."""

    def __init__(self, columns: object) -> None:
        data = columns if isinstance(columns, dict) else {}
        count = data.get("count")
        blob, codes, ndims, raw_dims = (data.get(k) for k in ("names", "dtypes", "ndims", "dims"))
        if not (
            type(count) is int
            and count >= 0
            and isinstance(blob, bytes)
            and isinstance(codes, bytes)
            and isinstance(ndims, bytes)
            and isinstance(raw_dims, bytes)
        ):
            raise ProtocolError("a tensor table needs count and the names, dtypes, ndims and dims columns")
        dims = array.array("q")
        if len(raw_dims) % dims.itemsize == 0:
            dims.frombytes(raw_dims)
        if sys.byteorder == "big":
            dims.byteswap()
        named = blob.count(b"\0") + 1 if count else 0
        if named != count or len(codes) != count or len(ndims) != count or len(dims) != sum(ndims):
            raise ProtocolError(f"the tensor table's columns do not hold {count} tensors")
        if count and max(codes) >= len(DTYPE_CODES):
            raise ProtocolError(f"unknown dtype code {max(codes)}")
        self.count, self.blob, self.codes, self.ndims, self.dims = count, blob, codes, ndims, dims

    @cached_property
    def starts(self) -> list[int]:
        """Where each row's dims start in `dims` (and the end)."""
        return list(itertools.accumulate(self.ndims, initial=0))

    @cached_property
    def names(self) -> list[str]:
        """Every name, in table order (split from the blob on first use)."""
        try:
            with paused_gc():
                return self.blob.decode("utf-8").split("\0") if self.count else []
        except UnicodeDecodeError:
            raise ProtocolError("tensor names are not valid UTF-8 text") from None

    @cached_property
    def index(self) -> dict[str, int]:
        with paused_gc():
            return dict(zip(self.names, range(len(self.names)), strict=True))

    def _find(self, name: object) -> int | None:
        """The row of `name`: from the index once built, else one search of the names blob
        (a few lookups in a 90k-tensor table never split or index it)."""
        if not isinstance(name, str) or not name or "\0" in name or not self.count:
            return None
        if "index" in self.__dict__:
            return self.index.get(name)
        try:
            key = name.encode("utf-8")
        except UnicodeEncodeError:
            return None
        blob, at = self.blob, 0
        while (at := blob.find(key, at)) >= 0:
            end = at + len(key)
            if (at == 0 or blob[at - 1] == 0) and (end == len(blob) or blob[end] == 0):
                return blob.count(b"\0", 0, at)
            at += 1
        return None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return self._find(name) is not None

    def __getitem__(self, name: str) -> dict[str, Any]:
        i = self._find(name)
        if i is None:
            raise KeyError(name)
        at = self.starts[i] if "starts" in self.__dict__ else sum(self.ndims[:i])
        return self._row(self.codes[i], self.dims[at : at + self.ndims[i]].tolist())

    @staticmethod
    def _row(code: int, shape: list[int]) -> dict[str, Any]:
        return {"dtype": DTYPE_CODES[code], "shape": shape, "nbytes": math.prod(shape) * _ITEMSIZE[code]}

    def _rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        dims, starts, row = self.dims.tolist(), self.starts, self._row
        for i, (name, code) in enumerate(zip(self.names, self.codes, strict=True)):
            yield name, row(code, dims[starts[i] : starts[i + 1]])

    def items(self) -> ItemsView[str, dict[str, Any]]:
        return _Items(self)

    def values(self) -> ValuesView[dict[str, Any]]:
        return _Values(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TensorRows):
            return (self.blob, self.codes, self.ndims, self.dims) == (other.blob, other.codes, other.ndims, other.dims)
        return super().__eq__(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TensorRows({len(self)} tensors)"


class _Items(ItemsView[str, dict[str, Any]]):
    _mapping: TensorRows

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        return self._mapping._rows()


class _Values(ValuesView[dict[str, Any]]):
    _mapping: TensorRows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (row for _, row in self._mapping._rows())
