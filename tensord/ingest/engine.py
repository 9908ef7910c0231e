"""Checkpoint files into slabs, fast: ``ingest_into``, usable in a client process and in the daemon.

It fills a reserved slab from ``FileTensor`` / ``ShardPlan`` sources (see ``reads``), or, with
``ingest_ranks``, every rank's slab of a ``--tp`` load in one pass over the files (each byte
is read once, into every slab that holds it: ``reads.plan_groups``); one slab is the one-rank
case of the same code. Reader threads take groups of chunks of ``chunk_bytes`` (a multiple of
BLOCK_BYTES, so each chunk's share of its tensor's fingerprint can be computed on its own) in
file order. Each thread reads a group and fingerprints it while it is hot in cache. A host
slab's chunk is read straight to its final place in the slab's shared mapping (one copy). A
GPU slab's chunk goes through a staging buffer of a small page-locked ring and an asynchronous
copy on a CUDA stream; an event per staging buffer guards its reuse, so reads overlap the
copies. Nothing is allocated per tensor: the ring is all the memory an ingest takes beyond the
slabs.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensord.checkpoint import FileTensor
from tensord.ingest.reads import GAP_BYTES, Chunk, Group, Source, opened, plan_groups, read_group
from tensord.sharding import ShardPlan
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest, TensorSpec
from tensord_dataplane.fingerprint import BLOCK_BYTES, FINGERPRINT_VERSION, fingerprint_finish, fingerprint_part
from tensord_dataplane.gpu import GpuAccess
from tensord_dataplane.host import HostAccess
from tensord_dataplane.slab import SlabAccess

log = logging.getLogger(__name__)

MiB = 1 << 20
#: Chunk sizes: small enough for a few chunks in flight to stay in the CPU's last-level cache
#: on the way to a host slab; larger for GPU slabs, where each chunk is one DMA copy.
#: (On a 2-core VM, 8 and 16 MiB were best for host slabs, 32 MiB was ~15% slower.)
HOST_CHUNK_BYTES = 8 * MiB
CUDA_CHUNK_BYTES = 32 * MiB
MAX_THREADS = 64


@dataclass(frozen=True)
class Ingested:
    """What an ingest made: each slab's fingerprints (manifest order), and the bytes it read
    from the files (each byte once, but for gaps between runs read through)."""

    fingerprints: list[list[int]]
    read: int


def ingest_into(
    slab: SlabAccess,
    manifest: Manifest,
    sources: Sequence[Source],
    *,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
    passed: Mapping[str, int] | None = None,
) -> list[int]:
    """Fill `slab` (laid out by `manifest`) from files; return the fingerprints in manifest order.

    ``sources[i]`` holds ``manifest.tensors[i]``: the same name, dtype and shape, checked first.
    `threads` reader threads; `progress` is called with the bytes of each chunk written (one call
    at a time). `chunk_bytes` (default by device) is rounded up to a multiple of BLOCK_BYTES.
    `passed`: the files already open, by path (see ``reads.opened``).
    Errors: InvalidArgument for sources that do not match or files that end early.
    """
    one = ingest_ranks(
        [slab], [manifest], [sources], threads=threads, progress=progress, chunk_bytes=chunk_bytes, passed=passed
    )
    return one.fingerprints[0]


def ingest_ranks(
    slabs: Sequence[SlabAccess],
    manifests: Sequence[Manifest],
    sources: Sequence[Sequence[Source]],
    *,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
    passed: Mapping[str, int] | None = None,
) -> Ingested:
    """Fill the slabs of a load's ranks in one pass over the files: ``slabs[r]``, laid out by
    ``manifests[r]``, from ``sources[r]`` (as ``ingest_into``'s). The slabs are of one kind on
    one device; `progress` is called with the bytes of each group written (every rank's)."""
    threads = check_threads(threads)
    if not slabs or not len(slabs) == len(manifests) == len(sources):
        raise InvalidArgument(f"{len(slabs)} slabs, {len(manifests)} manifests and {len(sources)} source lists")
    if len({(type(s), s.device) for s in slabs}) != 1 or len({m.fp_version for m in manifests}) != 1:
        raise InvalidArgument("the slabs of one ingest must be of one kind on one device, of one fingerprint")
    specs = [_check_sources(s, m, src) for s, m, src in zip(slabs, manifests, sources, strict=True)]
    chunk = _chunk_size(slabs[0], chunk_bytes)
    started = time.perf_counter()
    with opened([s for rank in sources for s in rank], passed) as fds:
        groups = plan_groups(sources, fds, chunk)
        on_gpu = isinstance(slabs[0], GpuAccess)  # then hash where the bytes land, in one batch
        fp = manifests[0].fp_version  # the definition of the version being made (or restored)
        shares, read = _run(slabs, specs, sources, groups, threads, progress, hash_chunks=not on_gpu, fp=fp)
    if on_gpu:
        fps = [
            s.fingerprints(m.offsets, m.sizes, fp).tolist()  # type: ignore[union-attr]
            for s, m in zip(slabs, manifests, strict=True)
        ]
    else:
        fps = [
            [fingerprint_finish(x, spec.nbytes, version=fp) for x, spec in zip(rank, rank_specs, strict=True)]
            for rank, rank_specs in zip(shares, specs, strict=True)
        ]
    total = sum(spec.nbytes for rank in specs for spec in rank)
    seconds = max(time.perf_counter() - started, 1e-9)
    log.info(
        "ingested %d tensors into %d slabs, %d bytes (%d read) in %.3f s (%.2f GB/s) into %s with %d threads",
        len(specs[0]),
        len(slabs),
        total,
        read,
        seconds,
        total / seconds / 1e9,
        slabs[0].device,
        threads,
    )
    return Ingested(fps, read)


def check_threads(threads: object) -> int:
    if not is_int(threads, 1, MAX_THREADS):
        raise InvalidArgument(f"threads must be an int in [1, {MAX_THREADS}], not {threads!r:.40}")
    return threads


def _check_sources(slab: SlabAccess, manifest: Manifest, sources: Sequence[Source]) -> list[TensorSpec]:
    specs = list(manifest.tensors)
    if len(sources) != len(specs):
        raise InvalidArgument(f"{len(sources)} sources for the {len(specs)} tensors of {manifest.name}")
    for spec, src in zip(specs, sources, strict=True):
        if not isinstance(src, (FileTensor, ShardPlan)):
            raise InvalidArgument(f"a source must be a FileTensor or ShardPlan, not {type(src).__name__}")
        if (src.name, src.dtype, tuple(src.shape)) != (spec.name, spec.dtype, spec.shape):
            raise InvalidArgument(
                f"source {src.name!r} {src.dtype} {list(src.shape)} does not match tensor "
                f"{spec.name!r} {spec.dtype} {list(spec.shape)} of {manifest.name}"
            )
        if src.nbytes != spec.nbytes or spec.offset + spec.nbytes > slab.nbytes:
            raise InvalidArgument(f"tensor {spec.name!r}: {src.nbytes} source bytes do not fit its place")
    return specs


def _chunk_size(slab: SlabAccess, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        chunk_bytes = CUDA_CHUNK_BYTES if slab.device.startswith("cuda") else HOST_CHUNK_BYTES
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise InvalidArgument(f"chunk_bytes must be a positive int, not {chunk_bytes!r:.40}")
    return -(-chunk_bytes // BLOCK_BYTES) * BLOCK_BYTES


class _Target:
    """Where chunks land: read straight into a host slab's mapping at their final place; else
    staged, then an asynchronous copy on a CUDA stream into a GPU slab on this node, or the
    slab's own ``write_from`` (a remote slab)."""

    def __init__(self, slab: SlabAccess, specs: list[TensorSpec]) -> None:
        self.slab, self.specs = slab, specs
        self.device = torch.device(slab.device) if isinstance(slab, GpuAccess) else None
        if self.device is not None and self.device.type != "cuda":
            self.device = None  # a tensor-backed slab in host memory: plain copies
        self.staged = not isinstance(slab, HostAccess)
        self.base = slab.base() if isinstance(slab, (HostAccess, GpuAccess)) else None

    def _at(self, chunk: Chunk) -> int:
        return self.specs[chunk.index].offset + chunk.start

    def place(self, chunk: Chunk) -> torch.Tensor:
        """The chunk's final bytes in a host slab (not staged)."""
        assert self.base is not None
        at = self._at(chunk)
        return self.base[at : at + chunk.nbytes]

    def write(self, chunk: Chunk, buf: torch.Tensor, stream: Any) -> None:
        at = self._at(chunk)
        if self.base is None:  # a slab on another node
            ptr, n = np.array([buf.data_ptr()]), np.array([chunk.nbytes])
            self.slab.write_from(ptr, np.array([at]), n, buf.device)
            return
        if stream is None:  # a tensor-backed slab in host memory
            self.base[at : at + chunk.nbytes].copy_(buf)
            return
        with torch.cuda.stream(stream):
            self.base[at : at + chunk.nbytes].copy_(buf, non_blocking=True)


def _run(
    slabs: Sequence[SlabAccess],
    specs: list[list[TensorSpec]],
    sources: Sequence[Sequence[Source]],
    groups: list[Group],
    threads: int,
    progress: Callable[[int], None] | None,
    *,
    hash_chunks: bool = True,
    fp: int = FINGERPRINT_VERSION,
) -> tuple[list[list[int]], int]:
    """Read, fingerprint (if `hash_chunks`) and write every group with `threads` workers; each
    slab's fingerprint shares (definition `fp`) and the bytes read."""
    shares = [[0] * len(rank) for rank in specs]
    empty = fingerprint_part(torch.empty(0, dtype=torch.uint8), 0, 0, version=fp)
    for rank, rank_specs in enumerate(specs):  # empty tensors have no chunks
        for i, spec in enumerate(rank_specs):
            if not spec.nbytes:
                shares[rank][i] = empty
    if not groups:
        return shares, 0
    targets = [_Target(slab, s) for slab, s in zip(slabs, specs, strict=True)]
    threads = min(threads, len(groups))
    size = max(g.staged for g in groups)
    staged, device = targets[0].staged, targets[0].device
    # A GPU slab gets two staging buffers per thread: one being copied while the next is read.
    ring: queue.SimpleQueue[tuple[torch.Tensor, Any]] = queue.SimpleQueue()
    if staged and device is None:  # a remote slab: each write registers its buffer's pages
        for buf in _page_disjoint(threads, size):
            ring.put((buf, None))
    for _ in range(threads * 2 if staged and device is not None else 0):
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        ring.put((buf, torch.cuda.Event()))
    streams = [torch.cuda.Stream(device) for _ in range(threads)] if device is not None else [None] * threads
    work = iter(groups)
    lock = threading.Lock()
    failed: list[BaseException] = []
    stop = threading.Event()
    read = [0]

    def fill(g: Group, views: list[torch.Tensor], junk: np.ndarray) -> list[int]:
        """Read a group into `views` (one per chunk); the chunks' fingerprint shares (while
        the bytes are in cache)."""
        for c, view in zip(g.chunks, views, strict=True):
            if view.numel() != c.nbytes or view.dtype != torch.uint8 or not view.is_contiguous():  # by address
                raise RuntimeError(f"chunk of {c.nbytes} bytes read into a view of {view.numel()} ({view.dtype})")
        c = g.chunks[0]
        n = read_group(g, [v.data_ptr() for v in views], junk, sources[c.rank][c.index])
        for view in views[1:] if g.same else ():  # a replicated tensor's chunk, read once
            if view.data_ptr() != views[0].data_ptr():
                view.copy_(views[0])
        with lock:
            read[0] += n
        if not hash_chunks:
            return [0] * len(views)
        if g.same:  # the same bytes at the same place of the same tensor: the same share
            return [fingerprint_part(views[0], c.start, specs[c.rank][c.index].nbytes, version=fp)] * len(views)
        return [
            fingerprint_part(v, x.start, specs[x.rank][x.index].nbytes, version=fp)
            for x, v in zip(g.chunks, views, strict=True)
        ]

    def worker(stream: Any) -> None:
        junk = np.empty(GAP_BYTES, dtype=np.uint8)
        try:
            if device is not None:
                torch.cuda.set_device(device)
            while not stop.is_set():
                with lock:
                    g = next(work, None)
                if g is None:
                    return
                if not staged:
                    parts = fill(g, [targets[c.rank].place(c) for c in g.chunks], junk)
                else:
                    buf, event = ring.get()
                    try:
                        if event is not None:
                            event.synchronize()  # its last copy is done: the buffer may be refilled
                        views = _staged(g, buf)
                        parts = fill(g, views, junk)
                        for c, view in zip(g.chunks, views, strict=True):
                            targets[c.rank].write(c, view, stream)
                        if event is not None:
                            event.record(stream)
                    finally:
                        ring.put((buf, event))
                with lock:
                    for c, share in zip(g.chunks, parts, strict=True):
                        shares[c.rank][c.index] += share
                    if progress is not None:
                        progress(g.nbytes)
        except BaseException as exc:
            with lock:
                failed.append(exc)
            stop.set()

    pool = [threading.Thread(target=worker, args=(s,), name=f"ingest-{i}", daemon=True) for i, s in enumerate(streams)]
    try:
        with _torch_single_threaded():
            for t in pool:
                t.start()
            try:
                for t in pool:
                    t.join()
            except BaseException:
                stop.set()
                for t in pool:
                    t.join()
                raise
    finally:
        for s in streams:
            if s is not None:
                s.synchronize()  # every copy has landed before the caller commits
    if failed:
        raise failed[0]
    return shares, read[0]


def _staged(g: Group, buf: torch.Tensor) -> list[torch.Tensor]:
    """Each chunk's place in a staging buffer: one for a replicated group (read once, every
    rank's copy made from it), else side by side."""
    if g.same:
        return [buf[: g.chunks[0].nbytes]] * len(g.chunks)
    ends = list(itertools.accumulate(c.nbytes for c in g.chunks))
    return [buf[end - c.nbytes : end] for c, end in zip(g.chunks, ends, strict=True)]


def _page_disjoint(count: int, size: int, page: int = 4096) -> list[torch.Tensor]:
    """`count` host buffers of `size` bytes on pages of their own: a Transfer Engine write
    registers the pages under its buffer, and threads writing at once must not share one."""
    step = -(-size // page) * page
    block = torch.empty(count * step + page, dtype=torch.uint8)
    skew = -block.data_ptr() % page
    return [block[skew + i * step : skew + i * step + size] for i in range(count)]


_single = {"depth": 0, "threads": 1}
_single_lock = threading.Lock()


@contextmanager
def _torch_single_threaded() -> Iterator[None]:
    """Torch's CPU ops on one thread each while ingests run: the readers are the parallelism,
    and torch's own pool under each of them (for the fingerprint sums) would put cores x
    readers threads on the cores. Nested and concurrent ingests restore it once, at the end."""
    with _single_lock:
        if _single["depth"] == 0:
            _single["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _single["depth"] += 1
    try:
        yield
    finally:
        with _single_lock:
            _single["depth"] -= 1
            if _single["depth"] == 0:
                torch.set_num_threads(_single["threads"])
