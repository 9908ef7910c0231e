"""Manifests: the immutable description of one version of a set, and its wire codec.

A manifest lists each tensor's dtype, shape, byte offset in the slab, byte length and
fingerprint. Offsets are aligned to ``ALIGN`` bytes so that every tensor view is aligned
for any dtype and for vectorised copies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sdk.errors import InvalidArgument

ALIGN = 256
MAX_TENSORS = 1_000_000
MAX_TENSOR_NAME_BYTES = 1024
MAX_DIMS = 16

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


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


class TensorSpec(NamedTuple):
    """One tensor of a set: where its bytes lie in the slab and what they should hash to."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0
    fingerprint: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes, self.fingerprint]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    tensors: tuple[TensorSpec, ...]
    nbytes: int
    created: float = 0.0
    origin: str = ""
    _index: dict[str, TensorSpec] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._index.update((t.name, t) for t in self.tensors)

    def __getitem__(self, tensor_name: str) -> TensorSpec:
        return self._index[tensor_name]

    def __contains__(self, tensor_name: object) -> bool:
        return tensor_name in self._index

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data, without alignment padding."""
        return sum(t.nbytes for t in self.tensors)

    @functools.cached_property
    def wire(self) -> dict[str, Any]:
        """The wire form, computed once (a manifest never changes)."""
        return self.to_wire()

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "tensors": [t.to_wire() for t in self.tensors],
            "nbytes": self.nbytes,
            "created": self.created,
            "origin": self.origin,
        }

    @classmethod
    def from_wire(cls, data: Any) -> Manifest:
        """Decode and validate a manifest; anything inconsistent raises InvalidArgument."""
        if not isinstance(data, dict):
            raise InvalidArgument("manifest must be a map")
        try:
            name, version, nbytes = data["name"], data["version"], data["nbytes"]
            raw = data["tensors"]
        except KeyError as exc:
            raise InvalidArgument(f"manifest lacks {exc.args[0]!r}") from None
        if not isinstance(raw, list):
            raise InvalidArgument("manifest tensors must be a list")
        tensors = []
        for entry in raw:  # the hot path of every read: one pass, no intermediate objects
            if type(entry) is not list or len(entry) != 6:
                raise InvalidArgument("manifest tensor entry must be a 6-item list")
            tensor, dtype, shape, offset, length, fp = entry
            if fp is not None and (type(fp) is not int or not 0 <= fp < 2**64):
                raise InvalidArgument("fingerprint must be a 64-bit unsigned integer")
            if type(offset) is not int:
                raise InvalidArgument(f"tensor {tensor!r:.80}: bad offset")
            spec = check_spec(tensor, dtype, shape, offset, fp)
            if length != spec.nbytes or type(length) is not int:
                raise InvalidArgument(f"tensor {spec.name!r}: length disagrees with dtype and shape")
            tensors.append(spec)
        if not _is_int(version) or version < 0 or not _is_int(nbytes):
            raise InvalidArgument("manifest version and nbytes must be integers")
        created, origin = data.get("created", 0.0), data.get("origin", "")
        if not isinstance(created, (int, float)) or not isinstance(origin, str):
            raise InvalidArgument("manifest created/origin have wrong types")
        check_layout(tensors, nbytes)
        return cls(name, version, tuple(tensors), nbytes, float(created), origin)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_spec(
    name: object, dtype: object, shape: object, offset: int = 0, fingerprint: int | None = None
) -> TensorSpec:
    """Validate one tensor's name, dtype and shape; return a spec with nbytes filled in."""
    if type(name) is not str or not name or "\0" in name:
        raise InvalidArgument(f"tensor name must be a non-empty string, not {name!r:.80}")
    try:
        if len(name.encode()) > MAX_TENSOR_NAME_BYTES:
            raise InvalidArgument(f"tensor name longer than {MAX_TENSOR_NAME_BYTES} bytes")
    except UnicodeEncodeError:
        raise InvalidArgument(f"tensor name {name!r:.80} is not valid UTF-8 text") from None
    size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
    if size is None:
        raise InvalidArgument(f"tensor {name!r}: unknown dtype {dtype!r:.40}")
    if type(shape) not in (list, tuple) or len(shape) > MAX_DIMS:  # type: ignore[arg-type]
        raise InvalidArgument(f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} ints")
    numel = 1
    for d in shape:  # type: ignore[attr-defined]
        if type(d) is not int or not 0 <= d < 2**48:
            raise InvalidArgument(f"tensor {name!r}: shape must hold non-negative ints, not {shape!r:.80}")
        numel *= d
    return TensorSpec(name, dtype, tuple(shape), offset, numel * size, fingerprint)  # type: ignore[arg-type]


def layout(specs: Iterable[TensorSpec]) -> tuple[list[TensorSpec], int]:
    """Place tensors one after another at aligned offsets; return them and the slab size."""
    placed, offset = [], 0
    for s in specs:
        placed.append(TensorSpec(s.name, s.dtype, s.shape, offset, s.nbytes, s.fingerprint))
        offset = align_up(offset + s.nbytes)
    return placed, offset


def check_layout(tensors: list[TensorSpec], nbytes: int) -> None:
    """Names unique; every tensor aligned, inside the slab and not overlapping another."""
    if len(tensors) > MAX_TENSORS:
        raise InvalidArgument(f"a set holds at most {MAX_TENSORS} tensors")
    if len({t.name for t in tensors}) != len(tensors):
        raise InvalidArgument("tensor names in a set must be unique")
    end = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset % ALIGN or t.offset < end or t.offset + t.nbytes > nbytes:
            raise InvalidArgument(f"tensor {t.name!r}: offset {t.offset} is misaligned or out of bounds")
        end = t.offset + t.nbytes


def specs_from_wire(raw: Any) -> list[TensorSpec]:
    """Decode a put's tensor list ``[[name, dtype, shape], ...]``."""
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise InvalidArgument(f"tensors must be a list of at most {MAX_TENSORS} entries")
    specs = []
    for entry in raw:
        if not isinstance(entry, list) or len(entry) != 3:
            raise InvalidArgument("each tensor must be [name, dtype, shape]")
        specs.append(check_spec(*entry))
    if len({s.name for s in specs}) != len(specs):
        raise InvalidArgument("tensor names in a set must be unique")
    return specs


def specs_to_wire(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[list[Any]]:
    return [[name, dtype, list(shape)] for name, (dtype, shape) in specs.items()]
