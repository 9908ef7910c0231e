"""Checkpoint files into a slab, fast: ``ingest_into``, usable in a client process and in the daemon.

It fills a reserved slab from ``FileTensor`` / ``ShardPlan`` sources (see ``reads``). Reader
threads take chunks of ``chunk_bytes`` (a multiple of BLOCK_BYTES, so each chunk's share of its
tensor's fingerprint can be computed on its own) in file order. Each thread reads a chunk and
fingerprints it while it is hot in cache. A host slab's chunk is read straight to its final
place in the slab's shared mapping (one copy). A GPU slab's chunk goes through a staging buffer
of a small page-locked ring and an asynchronous copy on a CUDA stream; an event per staging
buffer guards its reuse, so reads overlap the copies. Nothing is allocated per tensor: the ring
is all the memory an ingest takes beyond the slab.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from tensord.checkpoint import FileTensor
from tensord.ingest.reads import GAP_BYTES, Chunk, Source, opened, plan_chunks, read_chunk
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
    threads = check_threads(threads)
    specs = _check_sources(slab, manifest, sources)
    chunk = _chunk_size(slab, chunk_bytes)
    started = time.perf_counter()
    with opened(sources, passed) as fds:
        chunks = plan_chunks(sources, fds, chunk)
        on_gpu = isinstance(slab, GpuAccess)  # then hash where the bytes land, in one batch
        fp = manifest.fp_version  # the definition of the version being made (or restored)
        shares = _run(slab, specs, sources, chunks, threads, chunk, progress, hash_chunks=not on_gpu, fp=fp)
    if on_gpu:
        fps = slab.fingerprints(manifest.offsets, manifest.sizes, fp).tolist()  # type: ignore[union-attr]
    else:
        fps = [fingerprint_finish(s, spec.nbytes, version=fp) for s, spec in zip(shares, specs, strict=True)]
    total = sum(spec.nbytes for spec in specs)
    seconds = max(time.perf_counter() - started, 1e-9)
    log.info(
        "ingested %d tensors, %d bytes in %.3f s (%.2f GB/s) into %s with %d threads",
        len(specs),
        total,
        seconds,
        total / seconds / 1e9,
        slab.device,
        threads,
    )
    return fps


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
    slab: SlabAccess,
    specs: list[TensorSpec],
    sources: Sequence[Source],
    chunks: list[Chunk],
    threads: int,
    chunk: int,
    progress: Callable[[int], None] | None,
    *,
    hash_chunks: bool = True,
    fp: int = FINGERPRINT_VERSION,
) -> list[int]:
    """Read, fingerprint (if `hash_chunks`) and write every chunk with `threads` workers; the
    fingerprint shares (definition `fp`)."""
    shares = [0] * len(specs)
    for i, spec in enumerate(specs):  # empty tensors have no chunks
        if not spec.nbytes:
            shares[i] = fingerprint_part(torch.empty(0, dtype=torch.uint8), 0, 0, version=fp)
    if not chunks:
        return shares
    target = _Target(slab, specs)
    threads = min(threads, len(chunks))
    size = min(chunk, max(c.nbytes for c in chunks))
    device = target.device
    # A GPU slab gets two staging buffers per thread: one being copied while the next is read.
    ring: queue.SimpleQueue[tuple[torch.Tensor, Any]] = queue.SimpleQueue()
    if target.staged and device is None:  # a remote slab: each write registers its buffer's pages
        for buf in _page_disjoint(threads, size):
            ring.put((buf, None))
    for _ in range(threads * 2 if target.staged and device is not None else 0):
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        ring.put((buf, torch.cuda.Event()))
    streams = [torch.cuda.Stream(device) for _ in range(threads)] if device is not None else [None] * threads
    work = iter(chunks)
    lock = threading.Lock()
    failed: list[BaseException] = []
    stop = threading.Event()

    def fill(c: Chunk, view: torch.Tensor, junk: np.ndarray) -> int:
        """Read a chunk into `view`; its fingerprint share (while the bytes are in cache)."""
        if view.numel() != c.nbytes or view.dtype != torch.uint8 or not view.is_contiguous():  # written by address
            raise RuntimeError(f"chunk of {c.nbytes} bytes read into a view of {view.numel()} ({view.dtype})")
        read_chunk(c, view.data_ptr(), junk, sources[c.index])
        return fingerprint_part(view, c.start, specs[c.index].nbytes, version=fp) if hash_chunks else 0

    def worker(stream: Any) -> None:
        junk = np.empty(GAP_BYTES, dtype=np.uint8)
        try:
            if device is not None:
                torch.cuda.set_device(device)
            while not stop.is_set():
                with lock:
                    c = next(work, None)
                if c is None:
                    return
                if not target.staged:
                    share = fill(c, target.place(c), junk)
                else:
                    buf, event = ring.get()
                    try:
                        if event is not None:
                            event.synchronize()  # its last copy is done: the buffer may be refilled
                        share = fill(c, buf[: c.nbytes], junk)
                        target.write(c, buf[: c.nbytes], stream)
                        if event is not None:
                            event.record(stream)
                    finally:
                        ring.put((buf, event))
                with lock:
                    shares[c.index] += share
                    if progress is not None:
                        progress(c.nbytes)
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
    return shares


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
