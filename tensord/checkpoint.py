"""Safetensors checkpoint files: read and validate headers, find the tensors of a checkpoint.

Only headers are read here (8-byte little-endian length + JSON); tensor bytes stay on disk and
are described by ``FileTensor`` (file path, absolute byte offset, length) so that the ingest can
read them straight into a slab. Every file is untrusted input: anything inconsistent raises
``InvalidArgument`` naming the file and the tensor, a missing file or shard ``NotFound``.

Format: https://github.com/huggingface/safetensors (``safetensors/src/tensor.rs``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tensord.regular_files import NotRegular, kind, open_regular
from tensord_contract.bulk import paused_gc
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument, NotFound, Unauthorized
from tensord_contract.manifest import Table, TensorSpec

log = logging.getLogger(__name__)

#: safetensors dtype code -> tensord dtype name (a key of ``tensord_contract.manifest.DTYPE_SIZES``).
#: The sub-byte codes F4, F6_E2M3 and F6_E3M2 have no tensord dtype and are refused, as are
#: complex32 and complex128 on export (safetensors has no code for them).
SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}

#: tensord dtype name -> safetensors dtype code.
TENSORD_TO_SAFETENSORS: dict[str, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

_SUB_BYTE = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

#: The largest header accepted (the safetensors reference implementation's limit).
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX_BYTES = 100_000_000
_METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class FileTensor:
    """One tensor stored in a file: ``nbytes`` bytes at absolute byte ``offset`` of ``path``."""

    name: str
    dtype: str  # tensord dtype name
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def spec(self) -> TensorSpec:
        """The tensor as a manifest spec (no slab offset yet)."""
        return TensorSpec(self.name, self.dtype, self.shape, 0, self.nbytes)


def _bad(path: str, message: str, tensor: str | None = None) -> InvalidArgument:
    where = f"{path}: tensor {tensor!r}: " if tensor is not None else f"{path}: "
    details: dict[str, Any] = {"path": path}
    if tensor is not None:
        details["tensor"] = tensor
    return InvalidArgument(_one_line(where + message), **details)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _no_duplicates(path: str, what: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _bad(path, f"key appears twice in the {what}", key)
            out[key] = value
        return out

    return hook


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(path: str, raw: bytes, what: str) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(path, f"{what} is not UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(path, what), parse_constant=_reject_constant)
    except InvalidArgument:
        raise
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"{what} is not valid JSON: {exc}") from None


def read_header_and_metadata(path: str | os.PathLike[str]) -> tuple[list[FileTensor], dict[str, str]]:
    """Read and validate one file's header; return its tensors (by offset) and ``__metadata__``."""
    p = os.fspath(path)
    try:  # a FIFO (even one swapped in after a check by path) must not block the open
        with os.fdopen(open_regular(p), "rb") as f:
            return _header_of(f.fileno(), p)
    except NotRegular as exc:
        raise _bad(p, "is a directory" if exc.kind == "a directory" else "is not a regular file") from None
    except FileNotFoundError:
        raise NotFound(f"{p}: no such file", path=p) from None
    except OSError as exc:
        raise _bad(p, f"cannot read: {exc.strerror or exc}") from exc


def read_passed_checkpoint(files: Sequence[tuple[str, int]]) -> list[FileTensor]:
    """Every tensor of the files a caller opened and passed: (label, descriptor) pairs, the
    label standing for the path in the tensors and in errors. Nothing is opened by path; each
    descriptor must be a regular file open for reading; names must be unique across files."""
    out: list[FileTensor] = []
    seen: dict[str, str] = {}
    for label, fd in files:
        try:
            mode = os.fstat(fd).st_mode
            readable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY
        except OSError as exc:
            raise _bad(label, f"cannot read the passed descriptor: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(mode):
            raise _bad(label, f"the passed descriptor is {kind(mode)}, not a regular file")
        if not readable:
            raise _bad(label, "the passed descriptor is not open for reading")
        try:
            tensors, _ = _header_of(fd, label)
        except OSError as exc:
            raise _bad(label, f"cannot read: {exc.strerror or exc}") from exc
        for t in tensors:
            if t.name in seen:
                raise _bad(label, f"name also used in {seen[t.name]}", t.name)
            seen[t.name] = label
        out.extend(tensors)
    return out


def _header_of(fd: int, p: str) -> tuple[list[FileTensor], dict[str, str]]:
    """The tensors and metadata of the safetensors file open as `fd` (read with pread), named `p`."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise _bad(p, f"truncated: {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise _bad(p, f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise _bad(p, f"header length {n} runs past the end of the file ({size} bytes)")
    raw = os.pread(fd, n, 8)
    if len(raw) != n:
        raise _bad(p, "file changed while its header was read")
    with paused_gc():  # one dict per tensor
        header = _load_json(p, raw, "header")
        return _parse_header(p, header, data_len=size - 8 - n, data_start=8 + n)


def read_header(path: str | os.PathLike[str]) -> list[FileTensor]:
    """Read and validate one safetensors file's header (never its data); tensors by offset."""
    return read_header_and_metadata(path)[0]


def _parse_header(path: str, header: Any, *, data_len: int, data_start: int) -> tuple[list[FileTensor], dict[str, str]]:
    if not isinstance(header, dict):
        raise _bad(path, f"header must be a JSON object, not {type(header).__name__}")
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    entries = [_parse_entry(path, name, info, data_len=data_len) for name, info in header.items()]
    table = _table_of(path, entries)
    tensors: list[tuple[int, int, FileTensor]] = []
    for (name, code, _, begin, end), shape, nbytes in zip(entries, table.shapes, table.sizes.tolist(), strict=True):
        if end - begin != nbytes:
            raise _bad(
                path,
                f"data_offsets span {end - begin} bytes but {code} shape {list(shape)} needs {nbytes}",
                name,
            )
        dtype = SAFETENSORS_DTYPES[code]
        tensors.append((begin, end, FileTensor(name, dtype, shape, path, data_start + begin, nbytes)))
    tensors.sort(key=lambda e: (e[0], e[1], e[2].name))
    prev_end, prev_name = 0, ""
    for begin, end, tensor in tensors:
        if begin == end:  # an empty tensor owns no bytes
            continue
        if begin < prev_end:
            raise _bad(path, f"data_offsets [{begin}, {end}] overlap tensor {prev_name!r}", tensor.name)
        prev_end, prev_name = end, tensor.name
    if prev_end < data_len:
        log.warning("%s: %d bytes after the last tensor are not used", path, data_len - prev_end)
    return [e[2] for e in tensors], dict(metadata)


_Entry = tuple[str, str, Any, int, int]  # name, safetensors dtype code, shape, begin, end


def _parse_entry(path: str, name: str, info: Any, *, data_len: int) -> _Entry:
    """One header entry's form (its name, dtype and shape are checked with all the others)."""
    if not isinstance(info, dict):
        raise _bad(path, "entry must be an object with dtype, shape and data_offsets", name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _bad(path, f"entry lacks {', '.join(missing)}", name)
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        why = "sub-byte dtype is not supported" if isinstance(code, str) and code in _SUB_BYTE else "unknown dtype"
        raise _bad(path, f"{why} {code!r:.40}", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise _bad(path, f"data_offsets must be [begin, end] integers, not {offsets!r:.60}", name)
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _bad(path, f"data_offsets [{begin}, {end}] must satisfy 0 <= begin <= end", name)
    if end > data_len:
        raise _bad(
            path,
            f"data_offsets [{begin}, {end}] run past the data area of {data_len} bytes (file truncated?)",
            name,
        )
    return name, code, shape, begin, end


def _table_of(path: str, entries: list[_Entry]) -> Table:
    """Every entry's name, dtype and shape checked at once; a bad one is then found and named."""
    try:
        return _build(entries)
    except InvalidArgument as whole:
        raise _named(path, entries, whole) from None


def _build(entries: list[_Entry]) -> Table:
    return Table.build([e[0] for e in entries], [SAFETENSORS_DTYPES[e[1]] for e in entries], [e[2] for e in entries])


def _named(path: str, entries: list[_Entry], whole: InvalidArgument) -> InvalidArgument:
    """The error of the first entry that is bad on its own, found by halving (a few more bulk
    checks, never one per entry); `whole`'s own where no entry alone is (too many of them)."""
    while len(entries) > 1:
        for part in (entries[: len(entries) // 2], entries[len(entries) // 2 :]):
            try:
                _build(part)
            except InvalidArgument:
                entries = part
                break
        else:
            return _bad(path, whole.message)
    try:
        _build(entries)
    except InvalidArgument as exc:
        return _bad(path, f"invalid entry: {exc.message}", entries[0][0])
    return _bad(path, whole.message)


def read_checkpoint(path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None) -> list[FileTensor]:
    """Every tensor of a checkpoint: a ``.safetensors`` file or a directory of them.

    A directory is read through its ``model.safetensors.index.json`` (or the one
    ``*.safetensors.index.json``) when it has one, else every ``*.safetensors`` in it; names must be
    unique across files. Shard files must resolve, after symlinks, inside ``root`` (default: the
    directory itself; a Hugging Face cache snapshot links to ``../../blobs``, so pass the repo's
    cache folder there). Tensors come in file-name order, then by offset.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise NotFound(f"{p}: no such checkpoint file or directory", path=p)
    if not os.path.isdir(p):
        if root is not None:
            _check_inside(p, os.fspath(root), p)
        return read_header(p)
    base = os.fspath(root) if root is not None else p
    index = _find_index(p)
    tensors = _read_indexed(p, index, base) if index else _read_all(p, base)
    log.debug("%s: %d tensors, %d bytes", p, len(tensors), sum(t.nbytes for t in tensors))
    return tensors


def _find_index(directory: str) -> str | None:
    if os.path.isfile(os.path.join(directory, INDEX_NAME)):
        return os.path.join(directory, INDEX_NAME)
    found = sorted(n for n in os.listdir(directory) if n.endswith(INDEX_SUFFIX))
    if len(found) > 1:
        raise _bad(directory, f"several index files and no {INDEX_NAME}: {', '.join(found)}")
    return os.path.join(directory, found[0]) if found else None


def _check_inside(file: str, root: str, origin: str) -> None:
    real, real_root = os.path.realpath(file), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise _bad(origin, f"{file} resolves to {real}, outside {real_root}")


def _shard_path(directory: str, shard: Any, index: str, tensor: str, root: str) -> str:
    ok = (
        isinstance(shard, str)
        and shard not in ("", ".", "..")
        and "/" not in shard
        and "\\" not in shard
        and "\0" not in shard
    )
    if not ok:
        raise _bad(index, f"shard {shard!r:.80} must be a plain file name inside the directory", tensor)
    file = os.path.join(directory, shard)
    if not os.path.exists(file):
        raise NotFound(f"{index}: shard {shard!r} (for tensor {tensor!r}) does not exist", path=file, tensor=tensor)
    _check_inside(file, root, index)
    return file


def _read_indexed(directory: str, index: str, root: str) -> list[FileTensor]:
    try:  # an index that is a FIFO must not hang the open
        with os.fdopen(open_regular(index), "rb") as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
        if len(raw) > MAX_INDEX_BYTES:
            raise _bad(index, f"index larger than {MAX_INDEX_BYTES} bytes")
    except NotRegular:
        raise _bad(index, "index is not a regular file") from None
    except OSError as exc:
        raise _bad(index, f"cannot read: {exc.strerror or exc}") from exc
    data = _load_json(index, raw, "index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise _bad(index, "index must be an object with a weight_map object")
    by_shard: dict[str, set[str]] = {}
    checked: dict[str, str] = {}  # shard name -> its path, checked once
    with paused_gc():
        for tensor, shard in weight_map.items():
            file = checked.get(shard) if isinstance(shard, str) else None
            if file is None:
                file = checked[shard] = _shard_path(directory, shard, index, tensor, root)
            by_shard.setdefault(file, set()).add(tensor)
    out: list[FileTensor] = []
    for file in sorted(by_shard):
        found = read_header(file)
        names = {t.name for t in found}
        expected = by_shard[file]
        missing, extra = sorted(expected - names), sorted(names - expected)
        if missing:
            raise _bad(index, f"not found in its shard {os.path.basename(file)}", missing[0])
        if extra:
            owner = weight_map.get(extra[0])
            where = f"the index names shard {owner!r}" if owner is not None else "the index does not list it"
            raise _bad(file, f"found in this shard but {where}", extra[0])
        out.extend(found)
    return out


def _read_all(directory: str, root: str) -> list[FileTensor]:
    files = sorted(
        os.path.join(directory, n)
        for n in os.listdir(directory)
        if n.endswith(".safetensors") and not os.path.isdir(os.path.join(directory, n))
    )
    if not files:
        raise NotFound(f"{directory}: no .safetensors files and no index", path=directory)
    out: list[FileTensor] = []
    seen: dict[str, str] = {}
    for file in files:
        _check_inside(file, root, directory)
        for t in read_header(file):
            if t.name in seen:
                raise _bad(file, f"name also used in {seen[t.name]}", t.name)
            seen[t.name] = file
            out.append(t)
    return out


_SHARDED_ORIGIN = re.compile(r"#rank=(\d{1,6})&tp=(\d{1,6})$")


def recorded_rank(origin: str) -> tuple[int, int] | None:
    """(rank, tp) where a version's origin says it is one rank of a sharded load (`tensord load
    --tp`), else None; InvalidArgument for a rank outside [0, tp)."""
    found = _SHARDED_ORIGIN.search(origin) if origin.startswith("file:") else None
    if found is None:
        return None
    rank, tp = int(found[1]), int(found[2])
    if not 0 <= rank < tp:
        raise InvalidArgument(f"its origin names rank {rank} of tp={tp}")
    return rank, tp


def recorded_checkpoint(origin: str, allowed_roots: Sequence[str]) -> tuple[str, str]:
    """The checkpoint a version's manifest says it was loaded from (for one rank of a sharded
    load, the whole file: `recorded_rank`), if the daemon may read it again: (real path, the
    allowed root it lies under). Else an error saying why not: NotFound (no file origin: a put),
    Unauthorized (not under `ingest.allowed_roots`). Whether the bytes are still those of the
    version is for the caller to check (fingerprints)."""
    if not origin.startswith("file:"):
        raise NotFound(f"it came from {origin or 'a put'!r:.80}, not from a checkpoint file")
    path = _SHARDED_ORIGIN.sub("", origin[len("file:") :])
    real = os.path.realpath(path)
    root = next((r for r in allowed_roots if real == r or real.startswith(r + os.sep)), None)
    if root is None:
        raise Unauthorized(f"{path} is not under ingest.allowed_roots ({list(allowed_roots) or 'none'})")
    return real, root
