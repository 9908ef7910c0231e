"""Write safetensors files, streaming: the header first, then each tensor's bytes in order.

The header needs every tensor's dtype and shape before the first data byte, so the source is
walked twice unless ``specs`` are given: a sequence is simply iterated twice, a callable is
called twice (it should yield tensors lazily, e.g. copying each one from a GPU only when asked),
and a one-shot iterator is collected first (holding references to all of its tensors). Only one
tensor's bytes are in flight at a time. The file appears atomically: data goes to a temporary
file in the same directory, which is synced and renamed over ``path``; on any error it is removed
and ``path`` is left as it was.

Tensor bytes are written as they lie in memory: little-endian hosts only, as safetensors itself.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from tensord.checkpoint import MAX_HEADER_BYTES, TENSORD_TO_SAFETENSORS, FileTensor
from tensord_contract.errors import InvalidArgument, NotFound, OutOfCapacity, TensordError, Unauthorized
from tensord_contract.manifest import TensorSpec, check_spec

log = logging.getLogger(__name__)

#: One tensor: ``(name, torch.Tensor)`` or ``(name, dtype, shape, data)`` where ``data`` is a
#: bytes-like object (C-contiguous) or a torch tensor and ``dtype`` a tensord dtype name.
TensorItem = tuple[Any, ...]
TensorSource = Iterable[TensorItem] | Callable[[], Iterable[TensorItem]]


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: TensorSource,
    metadata: Mapping[str, str] | None = None,
    *,
    specs: Sequence[TensorSpec] | None = None,
    mode: int = 0o644,
) -> list[FileTensor]:
    """Stream ``tensors`` into a safetensors file at ``path``; return where each one landed.

    ``specs`` (name, dtype, shape per tensor, in the order the source yields them) spare a
    first walk over a callable source. ``metadata`` becomes the header's ``__metadata__``.
    """
    target = os.fspath(path)
    meta = _check_metadata(metadata)
    if not callable(tensors) and not isinstance(tensors, Sequence):
        tensors = list(tensors)  # a one-shot iterator cannot be walked twice
    if specs is None:
        planned = [_describe(item) for item in _items(tensors)]
    else:
        planned = [_checked_spec(s.name, s.dtype, s.shape) for s in specs]
    header, placed = _header(planned, meta)
    started = time.perf_counter()
    try:
        tmp = _open_temp(target)
    except OSError as exc:
        raise _not_written(target, exc) from None
    try:
        with os.fdopen(tmp.fd, "wb") as f:
            _written(target, f.write, struct.pack("<Q", len(header)) + header)
            count = 0
            for count, item in enumerate(_items(tensors), start=1):  # the source's own errors pass as they are
                if count > len(planned):
                    raise InvalidArgument(f"{target}: the source yielded more than {len(planned)} tensors")
                _written(target, f.write, _payload(item, planned[count - 1]))
            if count != len(planned):
                raise InvalidArgument(f"{target}: the source yielded {count} tensors, expected {len(planned)}")
            _written(target, f.flush)
            _written(target, os.fsync, f.fileno())
            _written(target, os.fchmod, f.fileno(), mode)
        _written(target, os.replace, tmp.path, target)
    except BaseException:
        _unlink_quietly(tmp.path)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(target)))
    data_start = 8 + len(header)
    result = [FileTensor(s.name, s.dtype, s.shape, target, data_start + s.offset, s.nbytes) for s in placed]
    _log_done(target, data_start + sum(s.nbytes for s in placed), len(result), started)
    return result


def _items(tensors: TensorSource) -> Iterator[TensorItem]:
    source = tensors() if callable(tensors) else tensors
    yield from source


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidArgument("safetensors metadata must map strings to strings")
    return dict(metadata)


def _checked_spec(name: object, dtype: object, shape: object) -> TensorSpec:
    try:
        spec = check_spec(name, dtype, shape)
    except UnicodeEncodeError:
        raise InvalidArgument(f"tensor name {name!r:.80} is not valid UTF-8 text") from None
    if spec.name == "__metadata__":
        raise InvalidArgument("tensor name '__metadata__' is reserved by safetensors")
    if spec.dtype not in TENSORD_TO_SAFETENSORS:
        raise InvalidArgument(f"tensor {spec.name!r}: dtype {spec.dtype} has no safetensors code")
    return spec


def _torch() -> Any:
    return sys.modules.get("torch")  # a torch tensor implies torch is imported


def _is_tensor(x: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_dtype(t: Any) -> str:
    return str(t.dtype).removeprefix("torch.")


def _split_item(item: object) -> tuple[object, object, object, object]:
    if isinstance(item, (tuple, list)) and len(item) == 2 and _is_tensor(item[1]):
        t = item[1]
        return item[0], _tensor_dtype(t), tuple(t.shape), t
    if isinstance(item, (tuple, list)) and len(item) == 4:
        return item[0], item[1], item[2], item[3]
    raise InvalidArgument(
        f"each tensor must be (name, torch.Tensor) or (name, dtype, shape, data), not {type(item).__name__}"
    )


def _describe(item: TensorItem) -> TensorSpec:
    name, dtype, shape, _ = _split_item(item)
    return _checked_spec(name, dtype, tuple(shape) if isinstance(shape, (list, tuple)) else shape)


def _payload(item: TensorItem, spec: TensorSpec) -> memoryview:
    """The bytes of one tensor, checked against the spec its header entry was written from."""
    name, dtype, shape, data = _split_item(item)
    shape = tuple(shape) if isinstance(shape, (list, tuple)) else shape
    if (name, dtype, shape) != (spec.name, spec.dtype, spec.shape):
        raise InvalidArgument(
            f"tensor {name!r:.80}: yielded as {dtype} {shape!r:.80}, but the header planned "
            f"{spec.name!r} {spec.dtype} {list(spec.shape)}"
        )
    if _is_tensor(data):
        buf = _tensor_bytes(spec, data)
    else:
        try:
            buf = memoryview(data).cast("B")  # type: ignore[arg-type]
        except TypeError as exc:
            raise InvalidArgument(f"tensor {spec.name!r}: data must be C-contiguous bytes-like: {exc}") from None
    if len(buf) != spec.nbytes:
        raise InvalidArgument(
            f"tensor {spec.name!r}: {len(buf)} bytes of data, {spec.dtype} {list(spec.shape)} needs {spec.nbytes}"
        )
    return buf


def _tensor_bytes(spec: TensorSpec, t: Any) -> memoryview:
    torch = _torch()
    if _tensor_dtype(t) != spec.dtype or tuple(t.shape) != spec.shape:
        raise InvalidArgument(
            f"tensor {spec.name!r}: data is {t.dtype} {list(t.shape)}, declared {spec.dtype} {list(spec.shape)}"
        )
    if t.layout != torch.strided or t.is_meta:
        raise InvalidArgument(f"tensor {spec.name!r}: only dense tensors with data can be written")
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _header(specs: list[TensorSpec], metadata: dict[str, str] | None) -> tuple[bytes, list[TensorSpec]]:
    """The padded JSON header and the specs with offsets relative to the data area."""
    entries: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    placed, offset = [], 0
    for s in specs:
        if s.name in entries:
            raise InvalidArgument(f"tensor {s.name!r}: name appears twice")
        code = TENSORD_TO_SAFETENSORS[s.dtype]
        entries[s.name] = {"dtype": code, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        placed.append(TensorSpec(s.name, s.dtype, s.shape, offset, s.nbytes))
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to a multiple of 8
    if len(raw) > MAX_HEADER_BYTES:
        raise InvalidArgument(f"safetensors header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return raw, placed


class _Temp:
    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path


def _open_temp(target: str) -> _Temp:
    directory = os.path.dirname(os.path.abspath(target))
    if os.path.isdir(target):
        raise InvalidArgument(f"{target}: is a directory")
    if not os.path.isdir(directory):
        raise NotFound(f"{directory}: no such directory to write {os.path.basename(target)} in")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory)
    return _Temp(fd, tmp)


def _written(target: str, write: Callable[..., object], *args: Any) -> None:
    """`write(*args)`, an OSError from it as the error that tells the caller (`_not_written`)."""
    try:
        write(*args)
    except OSError as exc:
        raise _not_written(target, exc) from None


def _not_written(target: str, exc: OSError) -> TensordError:
    """What a failed write of `target` tells the caller (the file is left as it was)."""
    kind: type[TensordError] = InvalidArgument
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        kind = Unauthorized
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        kind = OutOfCapacity
    return kind(f"{target}: cannot write: {exc.strerror or exc}", path=target)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s", path, exc)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("fsync of %s failed: %s", directory, exc)
    finally:
        os.close(fd)


def _log_done(path: str, nbytes: int, count: int, started: float) -> None:
    seconds = max(time.perf_counter() - started, 1e-9)
    log.info(
        "wrote %s: %d tensors, %d bytes in %.3f s (%.2f GB/s)",
        path,
        count,
        nbytes,
        seconds,
        nbytes / seconds / 1e9,
    )
