"""The dtypes a tensor may have, by name and by wire code (no numpy: the catalogue reads them)."""

from __future__ import annotations

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
