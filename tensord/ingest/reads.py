"""The file side of an ingest: which bytes of which file hold each chunk, and reading them.

A chunk is ``chunk_bytes`` of one tensor (a whole tensor, or one rank's shard of it, whose
rows may lie in many runs of its file: ``sharding.Runs``). Chunks are read in groups, in file
order (``plan_groups``): the ranks of a ``--tp`` load share one pass over the file, a group
holding the same bytes of every rank's shard of a tensor, so each byte of the file is read
once. A group is read with ``preadv`` (which releases the GIL) over an I/O vector built by
numpy, never a Python object per run, whose entries point into each rank's memory; small gaps
between runs are read into a scratch buffer rather than costing another system call.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from tensord.checkpoint import FileTensor
from tensord.sharding import Runs, ShardPlan, whole
from tensord_contract.errors import InvalidArgument, TransferError
from tensord_dataplane.fingerprint import BLOCK_BYTES
from tensord_dataplane.mapping import preadv

Source = FileTensor | ShardPlan

#: A gap this small between two runs of one chunk (a column-split shard) is read into a
#: scratch buffer rather than costing another system call.
GAP_BYTES = 64 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
_BATCH = 1 << 16  # runs whose I/O vectors are built at once


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, start + nbytes)`` of tensor ``index`` of rank ``rank``, whose bytes are
    ``runs`` of ``fd``."""

    index: int
    start: int
    nbytes: int
    fd: int
    runs: Runs
    rank: int = 0

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


@dataclass(frozen=True)
class Group:
    """Chunks read in one pass over their bytes of the file: one chunk, or the same bytes of
    one tensor for every rank of a load. ``same``: every chunk is the same bytes of the file (a
    replicated tensor), read once and copied; else the chunks' runs interleave in the file (a
    split's rows: rank 0's run, rank 1's, ...), read in one vector into each rank's memory."""

    chunks: tuple[Chunk, ...]
    same: bool = False

    @property
    def nbytes(self) -> int:
        """The bytes the group writes, every rank's."""
        return sum(c.nbytes for c in self.chunks)

    @property
    def staged(self) -> int:
        """The bytes its chunks take in one buffer (a replicated tensor's chunk once)."""
        return self.chunks[0].nbytes if self.same else self.nbytes


def plan_chunks(sources: Sequence[Source], fds: dict[str, int], chunk: int) -> list[Chunk]:
    """Every chunk of every tensor, in file order (sequential reads for the disk)."""
    return [c for g in plan_groups([sources], fds, chunk) for c in g.chunks]


def plan_groups(ranks: Sequence[Sequence[Source]], fds: dict[str, int], chunk: int) -> list[Group]:
    """Every chunk of every rank's tensors (``ranks[r]``: rank r's sources), grouped so each
    byte of the files is read once, in file order.

    A tensor of the same name and file in every rank is grouped: replicated (the same runs), each
    of its chunks of `chunk` bytes is read once for all ranks; split into runs that interleave
    (each row's runs side by side: a column split), every rank's chunk of about ``chunk / tp``
    bytes, whole rows where the fingerprint blocks allow, is read in one vector. Others (a split
    into one run per rank, which no other rank reads; one rank) are chunks of their own."""
    out: list[Group] = []
    alone = [[True] * len(sources) for sources in ranks]
    where = [{s.name: i for i, s in enumerate(sources)} for sources in ranks]
    for src in ranks[0] if len(ranks) > 1 else ():
        index = [w.get(src.name, -1) for w in where]
        srcs = [sources[i] for sources, i in zip(ranks, index, strict=True) if i >= 0]
        runs = [source_runs(s) for s in srcs]
        if len(srcs) < len(ranks) or len({source_path(s) for s in srcs}) != 1:
            continue
        same = all(r == runs[0] for r in runs)
        if not same and not _interleaved(runs):
            continue
        fd, size = fds[source_path(src)], runs[0].count * runs[0].length
        step = chunk if same else _rank_chunk(chunk, len(runs), runs[0].length)
        for at in range(0, size, step):
            n = min(step, size - at)
            chunks = (Chunk(i, at, n, fd, r, rank) for rank, (i, r) in enumerate(zip(index, runs, strict=True)))
            out.append(Group(tuple(chunks), same))
        for rank, i in enumerate(index):
            alone[rank][i] = False
    for rank, sources in enumerate(ranks):
        for i, src in enumerate(sources):
            if alone[rank][i]:
                one, fd = source_runs(src), fds[source_path(src)]
                size = one.count * one.length
                out.extend(Group((Chunk(i, at, min(chunk, size - at), fd, one, rank),)) for at in range(0, size, chunk))
    out.sort(key=lambda g: (g.chunks[0].fd, g.chunks[0].first))
    return out


def _interleaved(runs: Sequence[Runs]) -> bool:
    """Whether the ranks' runs lie side by side in each row, in rank order, none overlapping."""
    r = runs[0]
    return (
        r.count > 1
        and all((x.count, x.stride, x.length) == (r.count, r.stride, r.length) for x in runs)
        and all(b.first >= a.first + r.length for a, b in itertools.pairwise(runs))
        and runs[-1].first + r.length <= r.first + r.stride
    )


def _rank_chunk(chunk: int, tp: int, length: int) -> int:
    """A rank's chunk of a group of about `chunk` bytes: a multiple of BLOCK_BYTES (each chunk's
    fingerprint share is its own) and, where that allows, of whole runs (no row read twice)."""
    share = max(BLOCK_BYTES, chunk // tp // BLOCK_BYTES * BLOCK_BYTES)
    rows = math.lcm(length, BLOCK_BYTES)
    return share // rows * rows if rows <= share else share


def group_iov(chunks: Sequence[Chunk], dsts: Sequence[int], junk: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """The reads of `chunks` (one, or interleaved ones of one start and size, in rank order)
    into memory at `dsts`: (file offset, I/O vector of (address, length) rows) in file order.
    The runs are taken ``_BATCH`` at a time (a chunk of one-byte runs must not need gigabytes
    of vectors)."""
    c, r = chunks[0], chunks[0].runs
    end = c.start + c.nbytes
    first, last = c.start // r.length, (end - 1) // r.length
    if len(chunks) == 1 and (r.stride == r.length or first == last):  # one piece of the file: no vectors to build
        at = r.first + first * r.stride + (c.start - first * r.length)
        yield at, np.array([[dsts[0], c.nbytes]], dtype=np.int64)
        return
    firsts = np.array([x.runs.first for x in chunks], dtype=np.int64)
    to = np.array(dsts, dtype=np.int64) - c.start
    per = max(1, _BATCH // len(chunks))
    for a in range(first, last + 1, per):
        rows = np.arange(a, min(a + per, last + 1), dtype=np.int64)
        lo = np.maximum(rows * r.length, c.start)  # each piece's first and end byte in the shard
        hi = np.minimum((rows + 1) * r.length, end)
        skip = rows * (r.stride - r.length) + lo  # a piece's file offset past its run's first
        files = (skip[:, None] + firsts).ravel()
        addrs = (lo[:, None] + to).ravel()
        yield from _calls(files, addrs, np.repeat(hi - lo, len(chunks)), junk)


def _calls(
    files: np.ndarray, addrs: np.ndarray, lens: np.ndarray, junk: np.ndarray
) -> Iterator[tuple[int, np.ndarray]]:
    """Pieces in file order, none overlapping, as preadv calls: a gap of up to ``len(junk)``
    bytes between two pieces is read into `junk`, a larger one starts another call; a call has
    at most ``_IOV_MAX`` entries and starts and ends on a piece."""
    gaps = files[1:] - files[:-1] - lens[:-1]
    filled = np.flatnonzero((gaps > 0) & (gaps <= len(junk)))  # gap i lies after piece i
    pos = np.arange(len(files)) + np.searchsorted(filled, np.arange(len(files)))  # each piece's entry
    n = len(files) + len(filled)
    iov, at, piece = np.empty((n, 2), dtype=np.int64), np.empty(n, dtype=np.int64), np.zeros(n, dtype=bool)
    iov[pos, 0], iov[pos, 1], at[pos], piece[pos] = addrs, lens, files, True
    g = pos[filled] + 1
    iov[g, 0], iov[g, 1], at[g] = junk.ctypes.data, gaps[filled], files[filled] + lens[filled]
    bounds = [0, *pos[np.flatnonzero(gaps > len(junk)) + 1].tolist(), n]
    for s, e in itertools.pairwise(bounds):
        i = s
        while i < e:
            j = min(i + _IOV_MAX, e)
            if not piece[j - 1]:  # a gap entry lies between two pieces: end on the first
                j -= 1
            yield int(at[i]), iov[i:j]
            i = j + 1 if j < e and not piece[j] else j  # the next call starts on its piece


def read_chunk(c: Chunk, dst: int, junk: np.ndarray, source: Source) -> int:
    """Read a chunk's runs into memory at `dst` (``c.nbytes`` bytes); the bytes read."""
    return read_group(Group((c,)), [dst], junk, source)


def read_group(g: Group, dsts: Sequence[int], junk: np.ndarray, source: Source) -> int:
    """Read a group's chunks, each into memory at its `dsts` entry, with few system calls (a
    replicated group's first only: the caller copies it); the bytes read from the file, gaps
    read through included. `source`: the tensor, for errors."""
    done, chunks = 0, g.chunks[:1] if g.same else g.chunks
    for offset, iov in group_iov(chunks, dsts[: len(chunks)], junk):
        try:
            preadv(g.chunks[0].fd, iov, offset)
        except TransferError as exc:
            path, err = source_path(source), exc.details["errno"]
            why = (
                f"cannot read tensor {source.name!r}: {os.strerror(err)}"
                if err
                else f"file ended at byte {offset + exc.details['done']} inside tensor {source.name!r} "
                "(truncated while loading?)"
            )
            raise InvalidArgument(f"{path}: {why}", path=path, tensor=source.name) from None
        done += int(iov[:, 1].sum())
    return done
