"""The columns of a manifest on the wire: limits, dtype codes, and how each column is decoded
and checked (in bulk: one numpy pass per column, never one Python object per tensor)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tensord_contract.bulk import paused_gc
from tensord_contract.dtypes import DTYPE_CODE as DTYPE_CODE  # re-exported
from tensord_contract.dtypes import DTYPE_CODES, DTYPE_SIZES
from tensord_contract.errors import TensordError
from tensord_contract.limits import MAX_DIMS as MAX_DIMS  # re-exported; numpy-free code checks it too
from tensord_contract.wire import MAX_FRAME

ALIGN = 256
#: At most this many tensors in one set: 3.8x Kimi-K2's ~138,000 (fp8 weights + scales).
MAX_TENSORS = 1 << 19
MAX_TENSOR_NAME_BYTES = 1024
MAX_DIM = 1 << 48
#: No slab (so no tensor) may reach 2**62 bytes: sizes and offsets stay exact in int64.
MAX_BYTES = 1 << 62
#: A manifest's bytes on the wire per tensor besides its name and dims: the dtype and ndims
#: codes, offset, size and fingerprint (1 + 1 + 8 + 8 + 8).
WIRE_ROW_BYTES = 26
#: Room kept in a reply frame for what goes beside a manifest (pin, descriptor, framing).
REPLY_SPARE = 1 << 20
#: The largest manifest a set may have: `open` must be able to send it in one reply frame.
MAX_MANIFEST_BYTES = MAX_FRAME - REPLY_SPARE
#: The fingerprint definition new versions get (`tensord_dataplane.fingerprint`), and every
#: definition this code still checks (a manifest's ``fp`` names its own).
FINGERPRINT_VERSION = 3
FINGERPRINT_VERSIONS = (2, 3)

ITEMSIZE = np.array([DTYPE_SIZES[d] for d in DTYPE_CODES], dtype=np.int64)
LE_I64, LE_U64 = np.dtype("<i8"), np.dtype("<u8")


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def column(data: dict[str, Any], key: str, dtype: Any, count: int, error: type[TensordError]) -> np.ndarray:
    raw = data.get(key)
    dtype = np.dtype(dtype)
    if not isinstance(raw, bytes) or len(raw) != count * dtype.itemsize:
        raise error(f"column {key!r} must be {count} x {dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype=dtype)


def check_blob(raw: object, count: int, error: type[TensordError]) -> None:
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


def decode_names(raw: object, count: int, error: type[TensordError]) -> list[str]:
    check_blob(raw, count, error)
    if count == 0:
        return []
    try:
        with paused_gc():
            return raw.decode("utf-8").split("\0")  # type: ignore[attr-defined]
    except UnicodeDecodeError:
        raise error("tensor names are not valid UTF-8 text") from None


def row_products(ndims: np.ndarray, dims: np.ndarray, one: Any) -> np.ndarray:
    """The product of each row's dims (rows of `ndims[i]` values, concatenated in `dims`)."""
    out = np.full(len(ndims), one, dtype=dims.dtype)
    rows = ndims > 0
    if dims.size:
        starts = (np.cumsum(ndims, dtype=np.int64) - ndims)[rows]
        with np.errstate(over="ignore"):
            out[rows] = np.multiply.reduceat(dims, starts)
    return out


def check_servable(names_bytes: int, count: int, dims: int, error: type[TensordError], extra: int = 0) -> None:
    """Refuse a set whose manifest (`names_bytes` of names joined by NUL, `count` rows, `dims` dimensions in
    all), with `extra` bytes of descriptor beside it, would not fit one reply frame: accepted,
    it could never be opened."""
    need = names_bytes + WIRE_ROW_BYTES * count + 8 * dims + extra
    if need > MAX_MANIFEST_BYTES:
        raise error(
            f"a set of {count} tensors with {names_bytes} bytes of tensor names has a manifest of "
            f"{need} bytes{' with its descriptor' if extra else ''}, over the {MAX_MANIFEST_BYTES}-byte limit "
            f"(a reply frame is at most {MAX_FRAME} bytes): use shorter names or split it into several sets",
            limit=MAX_MANIFEST_BYTES,
            bytes=need,
        )
