"""Manifests: the immutable description of one version of a set, in columns, and their codec.

A set may hold ~100,000 tensors (a DeepSeek-class shard), so nothing here builds one Python
object per tensor on the hot paths: a ``Table`` (what a put declares) and a ``Manifest`` (a
committed version) are a few numpy arrays plus the tensor names, checked with vectorised
operations, and travel as a handful of binary blobs:

    names    UTF-8 names joined by NUL (names cannot contain NUL)
    dtypes   one byte per tensor: an index into DTYPE_CODES
    ndims    one byte per tensor
    dims     int64 little-endian, every shape flattened in tensor order
    offsets  int64: byte offset in the slab, a multiple of ALIGN       (manifest only)
    sizes    int64: byte length, numel x itemsize                        (manifest only)
    fingerprints  uint64, or nil before commit; "fp" names the definition (manifest only)

``TensorSpec`` (one tensor as a tuple) remains for cold paths: file headers, sharding, export.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from tensord_contract.bulk import paused_gc
from tensord_contract.errors import InvalidArgument, ProtocolError, TensordError

ALIGN = 256
#: At most this many tensors in one set: 3.8x Kimi-K2's ~138,000 (fp8 weights + scales).
MAX_TENSORS = 1 << 19
MAX_TENSOR_NAME_BYTES = 1024
MAX_DIMS = 16
MAX_DIM = 1 << 48
#: No slab (so no tensor) may reach 2**62 bytes: sizes and offsets stay exact in int64.
MAX_BYTES = 1 << 62
#: The fingerprint definition this code computes (`sdk.dataplane.fingerprint`).
FINGERPRINT_VERSION = 2

#: dtype name on the wire -> bytes per element. Names are torch's, without "torch.".
DTYPE_SIZES: dict[str, int] = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "complex32": 4,
    "complex64": 8,
    "complex128": 16,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}
#: The dtype code on the wire is the index in this tuple (part of the protocol: append only).
DTYPE_CODES: tuple[str, ...] = tuple(DTYPE_SIZES)
DTYPE_CODE: dict[str, int] = {name: i for i, name in enumerate(DTYPE_CODES)}
_ITEMSIZE = np.array([DTYPE_SIZES[d] for d in DTYPE_CODES], dtype=np.int64)
_LE_I64, _LE_U64 = np.dtype("<i8"), np.dtype("<u8")


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


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
        _check_blob(blob, len(names), InvalidArgument)  # no NUL, empty or overlong name
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
        _check_blob(blob, len(names), InvalidArgument)
        if len(dtypes) != len(names) or len(ndims) != len(names) or int(ndims.sum()) != len(dims):
            raise InvalidArgument("one dtype and one shape per tensor")
        if len(ndims) and int(ndims.max()) > MAX_DIMS:
            raise InvalidArgument(f"a shape has more than {MAX_DIMS} dimensions")
        if len(names) > MAX_TENSORS:
            raise InvalidArgument(f"a set holds at most {MAX_TENSORS} tensors, not {len(names)}")
        table = cls(names, dtypes, ndims, dims)
        table.__dict__["names_blob"] = blob
        return table

    @classmethod
    def from_wire(cls, data: Any, error: type[TensordError] = InvalidArgument) -> Table:
        """Decode and validate the columns of a wire map (`error` is raised for anything wrong)."""
        if not isinstance(data, dict):
            raise error("tensor table must be a map")
        count = data.get("count")
        if type(count) is not int or not 0 <= count <= MAX_TENSORS:
            raise error(f"tensor count must be an int in [0, {MAX_TENSORS}], not {count!r:.40}")
        raw_names = data.get("names")
        names = _names(raw_names, count, error)
        dtypes = _column(data, "dtypes", np.uint8, count, error)
        ndims = _column(data, "ndims", np.uint8, count, error)
        if count and int(ndims.max()) > MAX_DIMS:
            raise error(f"a shape has more than {MAX_DIMS} dimensions")
        dims = _column(data, "dims", _LE_I64, int(ndims.sum()), error)
        table = cls(names, dtypes, ndims, dims.astype(np.int64, copy=False))
        table.__dict__["names_blob"] = raw_names
        table._check(error)
        return table

    def _check(self, error: type[TensordError]) -> None:
        """Vectorised checks: dtype codes known, dims in range, sizes below MAX_BYTES, names unique."""
        n = len(self.names)
        if n > MAX_TENSORS:
            raise error(f"a set holds at most {MAX_TENSORS} tensors, not {n}")
        if n and int(self.dtypes.max()) >= len(DTYPE_CODES):
            raise error(f"unknown dtype code {int(self.dtypes.max())}")
        if self.dims.size and (int(self.dims.min()) < 0 or int(self.dims.max()) >= MAX_DIM):
            raise error("shape dimensions must lie in [0, 2**48)")
        rough = _row_products(self.ndims, self.dims.astype(np.float64), 1.0) * _ITEMSIZE[self.dtypes]
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
    def sizes(self) -> np.ndarray:
        """Bytes of each tensor (int64)."""
        return _row_products(self.ndims, self.dims, 1) * _ITEMSIZE[self.dtypes]

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
            "dims": self.dims.astype(_LE_I64, copy=False).tobytes(),
        }

    def layout(self) -> tuple[np.ndarray, int]:
        """Offsets placing the tensors one after another at ALIGN boundaries, and the slab size."""
        aligned = (self.sizes + (ALIGN - 1)) // ALIGN * ALIGN
        offsets = np.zeros(len(self.names), dtype=np.int64)
        if len(aligned) > 1:
            np.cumsum(aligned[:-1], out=offsets[1:])
        return offsets, int(aligned.sum())


class Manifest:
    """One committed version (or a reservation, version 0): a table placed in a slab.

    Rows are in the order of the put. `fingerprints` is None until commit. Immutable.
    """

    def __init__(
        self,
        name: str,
        version: int,
        table: Table,
        offsets: np.ndarray,
        nbytes: int,
        *,
        fingerprints: np.ndarray | None = None,
        created: float = 0.0,
        origin: str = "",
        check: type[TensordError] | None = InvalidArgument,
    ) -> None:
        self.name, self.version, self.table, self.offsets, self.nbytes = name, version, table, offsets, nbytes
        self.fingerprints, self.created, self.origin = fingerprints, created, origin
        if check is not None:
            self._check(check)

    def _check(self, error: type[TensordError]) -> None:
        """Every tensor aligned, inside the slab, not overlapping another; fingerprints fit."""
        n, offsets, sizes = len(self.table), self.offsets, self.table.sizes
        if type(self.nbytes) is not int or not 0 <= self.nbytes < MAX_BYTES:
            raise error(f"slab size {self.nbytes!r:.40} out of range")
        if offsets.shape != (n,) or (self.fingerprints is not None and self.fingerprints.shape != (n,)):
            raise error("one offset and one fingerprint per tensor")
        if not n:
            return
        if int(offsets.min()) < 0 or np.any(offsets % ALIGN):
            raise error("tensor offsets must be non-negative multiples of 256")
        ends = offsets + sizes
        if int(ends.max()) > self.nbytes:
            i = int(np.argmax(ends))
            raise error(f"tensor {self.table.names[i]!r:.80} ends at {int(ends[i])}, past the slab ({self.nbytes})")
        order = np.lexsort((sizes, offsets))
        overlap = offsets[order][1:] < ends[order][:-1]
        if overlap.any():
            i = int(order[1:][overlap][0])
            raise error(f"tensor {self.table.names[i]!r:.80} overlaps another")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.wire == other.wire

    __hash__ = None  # type: ignore[assignment]

    # -- a mapping of name -> row ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, tensor_name: object) -> bool:
        return tensor_name in self.table.index

    def __getitem__(self, tensor_name: str) -> TensorSpec:
        return self.spec(self.table.index[tensor_name])

    @property
    def names(self) -> list[str]:
        return self.table.names

    @property
    def sizes(self) -> np.ndarray:
        return self.table.sizes

    def spec(self, i: int) -> TensorSpec:
        fp = None if self.fingerprints is None else int(self.fingerprints[i])
        t = self.table
        return TensorSpec(t.names[i], t.dtype_name(i), t.shape(i), int(self.offsets[i]), int(t.sizes[i]), fp)

    @property
    def tensors(self) -> Iterator[TensorSpec]:
        """Every row as a TensorSpec (one object per tensor: for cold paths only)."""
        return (self.spec(i) for i in range(len(self.table)))

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data, without alignment padding."""
        return int(self.table.sizes.sum())

    def rows(self) -> dict[str, dict[str, Any]]:
        """name -> {dtype, shape, nbytes}, for `info` when asked for every tensor."""
        t = self.table
        return {
            k: {"dtype": DTYPE_CODES[d], "shape": list(s), "nbytes": n}
            for k, d, s, n in zip(t.names, t.dtypes.tolist(), t.shapes, t.sizes.tolist(), strict=True)
        }

    def dtype_counts(self) -> dict[str, int]:
        counts = np.bincount(self.table.dtypes, minlength=len(DTYPE_CODES))
        return {DTYPE_CODES[i]: int(c) for i, c in enumerate(counts) if c}

    def committed(self, version: int, fingerprints: np.ndarray, created: float) -> Manifest:
        """This reservation's manifest as the committed `version`."""
        return Manifest(
            self.name, version, self.table, self.offsets, self.nbytes,
            fingerprints=fingerprints, created=created, origin=self.origin, check=None,
        )  # fmt: skip

    # -- wire -----------------------------------------------------------------------------------
    @functools.cached_property
    def wire(self) -> dict[str, Any]:
        """The wire form, computed once (a manifest never changes)."""
        return {
            **self.table.to_wire(),
            "name": self.name,
            "version": self.version,
            "nbytes": self.nbytes,
            "created": self.created,
            "origin": self.origin,
            "offsets": self.offsets.astype(_LE_I64, copy=False).tobytes(),
            "sizes": self.table.sizes.astype(_LE_I64, copy=False).tobytes(),
            "fingerprints": None if self.fingerprints is None else self.fingerprints.astype(_LE_U64).tobytes(),
            "fp": FINGERPRINT_VERSION,
        }

    def to_wire(self) -> dict[str, Any]:
        return self.wire

    @classmethod
    def from_wire(cls, data: Any, error: type[TensordError] = ProtocolError) -> Manifest:
        """Decode and validate a manifest; anything inconsistent raises `error` (ProtocolError:
        a manifest comes from a daemon or the registry, never from a user)."""
        if not isinstance(data, dict):
            raise error("manifest must be a map")
        table = Table.from_wire(data, error)
        name, version, nbytes = data.get("name"), data.get("version"), data.get("nbytes")
        if type(name) is not str or type(version) is not int or version < 0:
            raise error("manifest name and version must be a string and a non-negative int")
        created, origin = data.get("created", 0.0), data.get("origin", "")
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not isinstance(origin, str):
            raise error("manifest created/origin have wrong types")
        n = len(table)
        offsets = _column(data, "offsets", _LE_I64, n, error).astype(np.int64)
        sizes = _column(data, "sizes", _LE_I64, n, error)
        if not np.array_equal(sizes, table.sizes):
            i = int(np.argmax(sizes != table.sizes))
            raise error(f"tensor {table.names[i]!r:.80}: byte size disagrees with its dtype and shape")
        fps = None
        if data.get("fingerprints") is not None:
            if data.get("fp") != FINGERPRINT_VERSION:
                raise error(
                    f"fingerprint definition {data.get('fp')!r:.20} unknown (this build: {FINGERPRINT_VERSION})"
                )
            fps = _column(data, "fingerprints", _LE_U64, n, error).astype(np.uint64)
        if type(nbytes) is not int:
            raise error("manifest nbytes must be an int")
        return cls(
            name, version, table, offsets, nbytes, fingerprints=fps, created=float(created), origin=origin, check=error
        )


def _column(data: dict[str, Any], key: str, dtype: Any, count: int, error: type[TensordError]) -> np.ndarray:
    raw = data.get(key)
    dtype = np.dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != count * dtype.itemsize:
        raise error(f"column {key!r} must be {count} x {dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype=dtype)


def _check_blob(raw: object, count: int, error: type[TensordError]) -> None:
    """Names joined by NUL: `count` of them, none empty or longer than the limit."""
    if not isinstance(raw, bytes):
        raise error("tensor names must be bytes")
    if count == 0:
        if raw:
            raise error("tensor names given for an empty table")
        return
    ends = np.flatnonzero(np.frombuffer(raw, dtype=np.uint8) == 0)
    if len(ends) != count - 1:
        raise error(f"{len(ends) + 1} tensor names for {count} tensors (names cannot contain NUL)")
    lengths = np.diff(np.concatenate(([-1], ends, [len(raw)]))) - 1
    if int(lengths.min()) < 1:
        raise error("tensor names must be non-empty")
    if int(lengths.max()) > MAX_TENSOR_NAME_BYTES:
        raise error(f"a tensor name is longer than {MAX_TENSOR_NAME_BYTES} bytes")


def _names(raw: object, count: int, error: type[TensordError]) -> list[str]:
    _check_blob(raw, count, error)
    if count == 0:
        return []
    try:
        with paused_gc():
            return raw.decode("utf-8").split("\0")  # type: ignore[attr-defined]
    except UnicodeDecodeError:
        raise error("tensor names are not valid UTF-8 text") from None


def _row_products(ndims: np.ndarray, dims: np.ndarray, one: Any) -> np.ndarray:
    """The product of each row's dims (rows of `ndims[i]` values, concatenated in `dims`)."""
    out = np.full(len(ndims), one, dtype=dims.dtype)
    rows = ndims > 0
    if dims.size:
        starts = (np.cumsum(ndims, dtype=np.int64) - ndims)[rows]
        with np.errstate(over="ignore"):
            out[rows] = np.multiply.reduceat(dims, starts)
    return out


def table_of(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> Table:
    """A Table from name -> (dtype name, shape)."""
    return Table.build(specs.keys(), (d for d, _ in specs.values()), (s for _, s in specs.values()))
