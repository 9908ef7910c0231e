"""What a put declares: a `Table` of tensor names, dtypes and shapes in columns, validated
(and `TensorSpec`, one tensor as a tuple, for cold paths)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from tensord_contract.bulk import paused_gc
from tensord_contract.errors import InvalidArgument, TensordError
from tensord_contract.manifest.columns import (
    ALIGN,
    DTYPE_CODE,
    DTYPE_CODES,
    ITEMSIZE,
    LE_I64,
    MAX_BYTES,
    MAX_DIM,
    MAX_DIMS,
    MAX_TENSORS,
    check_blob,
    check_servable,
    column,
    decode_names,
    row_products,
)

DIGEST_BYTES = 32  # `Table.digest`


class TensorSpec(NamedTuple):
    """One tensor as a tuple: dtype, shape, where its bytes lie in the slab, their fingerprint."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0
    fingerprint: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def check_spec(
    name: object, dtype: object, shape: object, offset: int = 0, fingerprint: int | None = None
) -> TensorSpec:
    """Validate one tensor's name, dtype and shape; return a spec with nbytes filled in."""
    table = Table.build([name], [dtype], [shape])  # type: ignore[list-item]
    return TensorSpec(
        table.names[0], DTYPE_CODES[table.dtypes[0]], table.shape(0), offset, int(table.sizes[0]), fingerprint
    )


class Table:
    """What a put declares: the tensors' names, dtypes and shapes, in columns, validated.

    Use `build` (from Python values) or `from_wire`; both refuse anything invalid.
    """

    __slots__ = ("__dict__", "dims", "dtypes", "names", "ndims")

    def __init__(self, names: list[str], dtypes: np.ndarray, ndims: np.ndarray, dims: np.ndarray) -> None:
        self.names, self.dtypes, self.ndims, self.dims = names, dtypes, ndims, dims

    def __len__(self) -> int:
        return len(self.names)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, names: Iterable[str], dtypes: Iterable[str], shapes: Iterable[Sequence[int]]) -> Table:
        """A table from Python values (dtype names, shapes as sequences of ints)."""
        names, dtypes, shapes = list(names), list(dtypes), list(shapes)
        if len(dtypes) != len(names) or len(shapes) != len(names):
            raise InvalidArgument("one dtype and one shape per tensor")
        bad = next((n for n in names if type(n) is not str), None)
        if bad is not None:
            raise InvalidArgument(f"tensor name must be a string, not {bad!r:.80}")
        try:
            blob = "\0".join(names).encode()
        except UnicodeEncodeError:
            raise InvalidArgument("tensor names must be valid UTF-8 text") from None
        check_blob(blob, len(names), InvalidArgument)  # no NUL, empty or overlong name
        try:
            codes = np.array([DTYPE_CODE[d] for d in dtypes], dtype=np.uint8)
        except (KeyError, TypeError):
            unknown = next(d for d in dtypes if not isinstance(d, str) or d not in DTYPE_CODE)
            raise InvalidArgument(f"unknown dtype {unknown!r:.40}") from None
        for s in shapes:
            if type(s) not in (list, tuple) or len(s) > MAX_DIMS or not all(type(d) is int for d in s):
                raise InvalidArgument(f"shape must be a list of at most {MAX_DIMS} non-negative ints, not {s!r:.80}")
        ndims = np.fromiter(map(len, shapes), dtype=np.uint8, count=len(shapes))
        flat = [d for s in shapes for d in s]
        if any(not 0 <= d < MAX_DIM for d in flat):
            raise InvalidArgument("shape dimensions must be non-negative ints below 2**48")
        table = cls(names, codes, ndims, np.array(flat, dtype=np.int64))
        table.__dict__["names_blob"] = blob
        table._check(InvalidArgument)
        return table

    @classmethod
    def of_columns(cls, names: list[str], dtypes: np.ndarray, ndims: np.ndarray, dims: np.ndarray) -> Table:
        """A table from columns already built from tensors: names are the keys of a mapping
        (so unique); only what the columns cannot guarantee is checked here. The daemon
        validates every table it receives in full."""
        if not set(map(type, names)) <= {str}:
            bad = next(n for n in names if type(n) is not str)
            raise InvalidArgument(f"tensor name must be a string, not {bad!r:.80}")
        try:
            blob = "\0".join(names).encode()
        except UnicodeEncodeError:
            raise InvalidArgument("tensor names must be valid UTF-8 text") from None
        check_blob(blob, len(names), InvalidArgument)
        if len(dtypes) != len(names) or len(ndims) != len(names) or int(ndims.sum()) != len(dims):
            raise InvalidArgument("one dtype and one shape per tensor")
        if len(ndims) and int(ndims.max()) > MAX_DIMS:
            raise InvalidArgument(f"a shape has more than {MAX_DIMS} dimensions")
        if len(names) > MAX_TENSORS:
            raise InvalidArgument(f"a set holds at most {MAX_TENSORS} tensors, not {len(names)}")
        check_servable(len(blob), len(names), len(dims), InvalidArgument)
        table = cls(names, dtypes, ndims, dims)
        table.__dict__["names_blob"] = blob
        return table

    @classmethod
    def from_wire(cls, data: Any, error: type[TensordError] = InvalidArgument, known: Table | None = None) -> Table:
        """Decode and validate the columns of a wire map (`error` is raised for anything wrong).
        `known`: a table decoded before (another version's), used as it is where the wire
        carries the same columns (compared as bytes: a training step's layout is not decoded
        again)."""
        if known is not None and known.same_wire(data):
            return known
        if not isinstance(data, dict):
            raise error("tensor table must be a map")
        count = data.get("count")
        if type(count) is not int or not 0 <= count <= MAX_TENSORS:
            raise error(f"tensor count must be an int in [0, {MAX_TENSORS}], not {count!r:.40}")
        raw_names = data.get("names")
        names = decode_names(raw_names, count, error)
        dtypes = column(data, "dtypes", np.uint8, count, error)
        ndims = column(data, "ndims", np.uint8, count, error)
        if count and int(ndims.max()) > MAX_DIMS:
            raise error(f"a shape has more than {MAX_DIMS} dimensions")
        dims = column(data, "dims", LE_I64, int(ndims.sum()), error)
        table = cls(names, dtypes, ndims, dims.astype(np.int64, copy=False))
        table.__dict__["names_blob"] = raw_names
        table._check(error)
        return table

    def same_wire(self, data: Any) -> bool:
        """Whether a wire map carries exactly this table's columns (decoding it would give an
        equal table): byte comparisons, no decoding."""
        return (
            isinstance(data, dict)
            and data.get("count") == len(self.names)
            and data.get("names") == self.names_blob
            and data.get("dtypes") == self.dtypes.tobytes()
            and data.get("ndims") == self.ndims.tobytes()
            and data.get("dims") == self.dims.astype(LE_I64, copy=False).tobytes()
        )

    def _check(self, error: type[TensordError]) -> None:
        """Vectorised checks: dtype codes known, dims in range, sizes below MAX_BYTES, names unique."""
        n = len(self.names)
        if n > MAX_TENSORS:
            raise error(f"a set holds at most {MAX_TENSORS} tensors, not {n}")
        check_servable(len(self.names_blob), n, int(self.dims.size), error)
        if n and int(self.dtypes.max()) >= len(DTYPE_CODES):
            raise error(f"unknown dtype code {int(self.dtypes.max())}")
        if self.dims.size and (int(self.dims.min()) < 0 or int(self.dims.max()) >= MAX_DIM):
            raise error("shape dimensions must lie in [0, 2**48)")
        rough = row_products(self.ndims, self.dims.astype(np.float64), 1.0) * ITEMSIZE[self.dtypes]
        if n and float(rough.max()) >= MAX_BYTES:
            raise error("a tensor would hold 2**62 bytes or more")
        if len(self.index) != n:
            seen: set[str] = set()
            dup = next(k for k in self.names if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise error(f"tensor names in a set must be unique ({dup!r:.80} appears twice)")

    # -- columns derived once -----------------------------------------------------------------
    @functools.cached_property
    def index(self) -> dict[str, int]:
        """Tensor name -> row."""
        with paused_gc():
            return dict(zip(self.names, range(len(self.names)), strict=True))

    @functools.cached_property
    def names_blob(self) -> bytes:
        return "\0".join(self.names).encode()

    @functools.cached_property
    def digest(self) -> bytes:
        """BLAKE2b-256 of the wire columns: names the table without sending it (`put_begin`)."""
        h = hashlib.blake2b(digest_size=DIGEST_BYTES)
        for part in self.to_wire().values():
            raw = part if isinstance(part, bytes) else part.to_bytes(8, "little")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
        return h.digest()

    @functools.cached_property
    def sizes(self) -> np.ndarray:
        """Bytes of each tensor (int64)."""
        return row_products(self.ndims, self.dims, 1) * ITEMSIZE[self.dtypes]

    @functools.cached_property
    def dim_starts(self) -> np.ndarray:
        starts = np.zeros(len(self.names) + 1, dtype=np.int64)
        np.cumsum(self.ndims, out=starts[1:])
        return starts

    @functools.cached_property
    def shapes(self) -> list[tuple[int, ...]]:
        """Every shape as a tuple (built once, on first use)."""
        dims, starts = self.dims.tolist(), self.dim_starts.tolist()
        with paused_gc():
            return [tuple(dims[a:b]) for a, b in itertools.pairwise(starts)]

    def shape(self, i: int) -> tuple[int, ...]:
        a, b = int(self.dim_starts[i]), int(self.dim_starts[i + 1])
        return tuple(self.dims[a:b].tolist())

    def dtype_name(self, i: int) -> str:
        return DTYPE_CODES[self.dtypes[i]]

    def to_wire(self) -> dict[str, Any]:
        return {
            "count": len(self.names),
            "names": self.names_blob,
            "dtypes": self.dtypes.tobytes(),
            "ndims": self.ndims.tobytes(),
            "dims": self.dims.astype(LE_I64, copy=False).tobytes(),
        }

    def layout(self) -> tuple[np.ndarray, int]:
        """Offsets placing the tensors one after another at ALIGN boundaries, and the slab size."""
        aligned = (self.sizes + (ALIGN - 1)) // ALIGN * ALIGN
        offsets = np.zeros(len(self.names), dtype=np.int64)
        if len(aligned) > 1:
            np.cumsum(aligned[:-1], out=offsets[1:])
        return offsets, int(aligned.sum())


def table_of(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> Table:
    """A Table from name -> (dtype name, shape)."""
    return Table.build(specs.keys(), (d for d, _ in specs.values()), (s for _, s in specs.values()))
