"""The file side of an ingest: which byte ranges of which files hold each chunk, and reading them.

A chunk is ``chunk_bytes`` of one tensor (a whole tensor, or one rank's shard of it, whose
rows may lie in several ranges of its file). Chunks are read in file order, each with
``os.preadv`` (which releases the GIL); small gaps between a shard's ranges are read into a
scratch buffer rather than costing another system call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from tensord.checkpoint import FileTensor
from tensord.sharding import ShardPlan
from tensord_contract.errors import InvalidArgument

Source = FileTensor | ShardPlan

#: A gap this small between two ranges of one chunk (a row-parallel shard) is read into a
#: scratch buffer rather than costing another system call.
GAP_BYTES = 64 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, start + nbytes)`` of tensor ``index``: the file ranges that hold them."""

    index: int
    start: int
    nbytes: int
    fd: int
    ranges: tuple[tuple[int, int], ...]


def source_ranges(source: Source) -> tuple[tuple[int, int], ...]:
    if isinstance(source, ShardPlan):
        return source.ranges
    return ((source.offset, source.nbytes),) if source.nbytes else ()


def source_path(source: Source) -> str:
    return source.tensor.path if isinstance(source, ShardPlan) else source.path


@contextmanager
def opened(sources: Sequence[Source], passed: Mapping[str, int] | None = None) -> Iterator[dict[str, int]]:
    """Open every source file once, read-only; check each is long enough for its ranges.

    `passed`: files already open (path label -> descriptor, handed over by the caller): those
    are used, never opened by path, and left open."""
    ends: dict[str, int] = {}
    for src in sources:
        path = source_path(src)
        ends[path] = max(ends.get(path, 0), max((off + n for off, n in source_ranges(src)), default=0))
    fds: dict[str, int] = {}
    try:
        for path, end in ends.items():
            if passed is not None and path not in passed:
                raise InvalidArgument(f"{path}: not among the files passed", path=path)
            fd = fds[path] = passed[path] if passed is not None else _open(path)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
            size = os.fstat(fd).st_size
            if size < end:
                raise InvalidArgument(f"{path}: {size} bytes, its tensors need {end} (truncated?)", path=path)
        yield fds
    finally:
        if passed is None:
            for fd in fds.values():
                os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: the checkpoint file vanished", path=path) from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot open: {exc.strerror or exc}", path=path) from exc


def plan_chunks(sources: Sequence[Source], fds: dict[str, int], chunk: int) -> list[Chunk]:
    """Every chunk of every tensor, in file order (sequential reads for the disk)."""
    out: list[Chunk] = []
    for index, src in enumerate(sources):
        out.extend(_split(index, fds[source_path(src)], source_ranges(src), chunk))
    out.sort(key=lambda c: (c.fd, c.ranges[0][0]))
    return out


def _split(index: int, fd: int, ranges: Sequence[tuple[int, int]], chunk: int) -> Iterator[Chunk]:
    pieces: list[tuple[int, int]] = []
    start = filled = 0
    for offset, length in ranges:
        off, left = offset, length
        while left:
            take = min(left, chunk - filled)
            pieces.append((off, take))
            off, left, filled = off + take, left - take, filled + take
            if filled == chunk:
                yield Chunk(index, start, filled, fd, tuple(pieces))
                start, filled, pieces = start + filled, 0, []
    if filled:
        yield Chunk(index, start, filled, fd, tuple(pieces))


def read_chunk(c: Chunk, dst: memoryview, junk: memoryview, source: Source) -> None:
    """Read a chunk's ranges into `dst`, one preadv per run of ranges with small gaps."""
    iovs: list[memoryview] = []
    pos = span_start = span_end = 0
    for offset, length in c.ranges:
        if iovs and (offset < span_end or offset - span_end > len(junk) or len(iovs) >= _IOV_MAX - 1):
            _preadv_all(c.fd, iovs, span_start, source)
            iovs = []
        if not iovs:
            span_start = offset
        elif offset > span_end:
            iovs.append(junk[: offset - span_end])
        iovs.append(dst[pos : pos + length])
        pos, span_end = pos + length, offset + length
    if iovs:
        _preadv_all(c.fd, iovs, span_start, source)


def _preadv_all(fd: int, iovs: list[memoryview], offset: int, source: Source) -> None:
    want = sum(len(v) for v in iovs)
    done = 0
    while done < want:
        try:
            n = os.preadv(fd, iovs, offset + done)
        except OSError as exc:
            raise InvalidArgument(
                f"{source_path(source)}: cannot read tensor {source.name!r}: {exc.strerror or exc}",
                path=source_path(source),
                tensor=source.name,
            ) from exc
        if n <= 0:
            raise InvalidArgument(
                f"{source_path(source)}: file ended at byte {offset + done} inside tensor {source.name!r} "
                "(truncated while loading?)",
                path=source_path(source),
                tensor=source.name,
            )
        done += n
        while iovs and n >= len(iovs[0]):  # drop what a short read filled
            n -= len(iovs[0])
            iovs = iovs[1:]
        if n:
            iovs[0] = iovs[0][n:]
