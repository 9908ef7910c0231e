"""The file side of an ingest: which bytes of which file hold each chunk, and reading them.

A chunk is ``chunk_bytes`` of one tensor (a whole tensor, or one rank's shard of it, whose
rows may lie in many runs of its file: ``sharding.Runs``). Chunks are read in file order, each
with ``preadv`` (which releases the GIL) over an I/O vector built by numpy, never a Python
object per run; small gaps between a shard's runs are read into a scratch buffer rather than
costing another system call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from tensord.checkpoint import FileTensor
from tensord.sharding import Runs, ShardPlan, whole
from tensord_contract.errors import InvalidArgument, TransferError
from tensord_dataplane.mapping import preadv

Source = FileTensor | ShardPlan

#: A gap this small between two runs of one chunk (a column-split shard) is read into a
#: scratch buffer rather than costing another system call.
GAP_BYTES = 64 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
_BATCH = 1 << 16  # runs whose I/O vectors are built at once


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, start + nbytes)`` of tensor ``index``, whose bytes are ``runs`` of ``fd``."""

    index: int
    start: int
    nbytes: int
    fd: int
    runs: Runs

    @property
    def first(self) -> int:
        """The file offset of the chunk's first byte."""
        r = self.runs
        return r.first + self.start // r.length * r.stride + self.start % r.length


def source_runs(source: Source) -> Runs:
    return source.runs if isinstance(source, ShardPlan) else whole(source)


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
        ends[path] = max(ends.get(path, 0), source_runs(src).end)
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
        runs, fd = source_runs(src), fds[source_path(src)]
        size = runs.count * runs.length
        out.extend(Chunk(index, at, min(chunk, size - at), fd, runs) for at in range(0, size, chunk))
    out.sort(key=lambda c: (c.fd, c.first))
    return out


def chunk_iov(c: Chunk, dst: int, junk: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """The reads of a chunk into memory at `dst`: (file offset, I/O vector of (address, length)
    rows), gaps of up to ``len(junk)`` bytes between runs read into `junk`; the runs are taken
    ``_BATCH`` at a time (a chunk of one-byte runs must not need gigabytes of vectors)."""
    r, end = c.runs, c.start + c.nbytes
    first, last = c.start // r.length, (end - 1) // r.length
    if r.stride == r.length or first == last:  # one contiguous piece of the file
        yield c.first, np.array([[dst, c.nbytes]], dtype=np.int64)
        return
    gap = r.stride - r.length
    m = _IOV_MAX - 1 if _IOV_MAX % 2 == 0 else _IOV_MAX  # odd: a call starts and ends on a piece
    for a in range(first, last + 1, _BATCH):
        rows = np.arange(a, min(a + _BATCH, last + 1), dtype=np.int64)
        lo = np.maximum(rows * r.length, c.start)  # each piece's first and end byte in the shard
        hi = np.minimum((rows + 1) * r.length, end)
        files = (r.first + rows * r.stride + (lo - rows * r.length)).tolist()
        pieces = np.stack([dst + lo - c.start, hi - lo], axis=1)
        if gap > len(junk):
            yield from ((f, pieces[i : i + 1]) for i, f in enumerate(files))
            continue
        iov = np.empty((2 * len(rows) - 1, 2), dtype=np.int64)  # piece, gap, piece, ...
        iov[0::2] = pieces
        iov[1::2] = (junk.ctypes.data, gap)
        yield from ((files[i // 2], iov[i : i + m]) for i in range(0, len(iov), m + 1))


def read_chunk(c: Chunk, dst: int, junk: np.ndarray, source: Source) -> None:
    """Read a chunk's runs into memory at `dst` (``c.nbytes`` bytes), with few system calls."""
    for offset, iov in chunk_iov(c, dst, junk):
        try:
            preadv(c.fd, iov, offset)
        except TransferError as exc:
            path, err = source_path(source), exc.details["errno"]
            why = (
                f"cannot read tensor {source.name!r}: {os.strerror(err)}"
                if err
                else f"file ended at byte {offset + exc.details['done']} inside tensor {source.name!r} "
                "(truncated while loading?)"
            )
            raise InvalidArgument(f"{path}: {why}", path=path, tensor=source.name) from None
