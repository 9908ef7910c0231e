"""Checkpoint files into slabs, fast; and sets back out to safetensors files.

``ingest_into`` is the core, usable in a client process (the CLI) and inside the daemon: it
fills a reserved slab from ``FileTensor`` / ``ShardPlan`` sources. Reader threads take chunks
of ``chunk_bytes`` (a multiple of BLOCK_BYTES, so each chunk's share of its tensor's
fingerprint can be computed on its own) in file order. Each thread reads a chunk with
``os.preadv`` (which releases the GIL) and fingerprints it while it is hot in cache. A host
slab's chunk is read straight to its final place in the slab's shared mapping (one copy). A
GPU slab's chunk goes through a staging buffer of a small page-locked ring and an asynchronous
copy on a CUDA stream; an event per staging buffer guards its reuse, so reads overlap the
copies. Nothing is allocated per tensor: the ring is all the memory an ingest takes beyond
the slab.

``load_checkpoint``, ``load_sharded`` and ``export_set`` are the client-side operations the
CLI runs; they validate everything before they reserve, and commit only complete sets.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdk.dataplane.fingerprint import BLOCK_BYTES, fingerprint_finish, fingerprint_part
from sdk.dataplane.gpu import GpuSlab
from sdk.dataplane.host import HostSlab
from sdk.dataplane.slab import Slab
from tensord.checkpoint import TENSORD_TO_SAFETENSORS, FileTensor, read_checkpoint
from tensord.export import write_safetensors
from tensord.sharding import ShardPlan, ShardRules, plan_shards
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest, TensorSpec
from tensord_contract.names import check_name

if TYPE_CHECKING:
    from sdk import Client

log = logging.getLogger(__name__)

Source = FileTensor | ShardPlan

MiB = 1 << 20
#: Chunk sizes: small enough for a few chunks in flight to stay in the CPU's last-level cache
#: on the way to a host slab; larger for GPU slabs, where each chunk is one DMA copy.
#: (On a 2-core VM, 8 and 16 MiB were best for host slabs, 32 MiB was ~15% slower.)
HOST_CHUNK_BYTES = 8 * MiB
CUDA_CHUNK_BYTES = 32 * MiB
MAX_THREADS = 64
#: A gap this small between two ranges of one chunk (a row-parallel shard) is read into a
#: scratch buffer rather than costing another system call.
_GAP_BYTES = 64 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)


class Progress:
    """Bytes, GB/s and ETA: a one-line bar on stderr, and/or log lines (for the daemon's log).

    ``advance`` is the callable ``ingest_into`` takes; it is safe to call from several threads.
    """

    def __init__(
        self,
        total: int,
        enabled: bool,
        *,
        logger: logging.Logger | None = None,
        label: str = "ingest",
        log_every: float = 5.0,
    ) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.logger, self.label, self.log_every = logger, label, log_every
        self.start = self._last = self._logged = time.perf_counter()
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            finished = self.done >= self.total
            if self.enabled and (now - self._last > 0.2 or finished):
                self._last = now
                self._bar(now, finished)
            if self.logger is not None and (now - self._logged > self.log_every or finished):
                self._logged = now
                done_gb, total_gb, rate, eta = self._figures(now)
                self.logger.info("%s: %.2f/%.2f GB, %.2f GB/s, ETA %.1f s", self.label, done_gb, total_gb, rate, eta)

    def _figures(self, now: float) -> tuple[float, float, float, float]:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        return self.done / 1e9, self.total / 1e9, rate / 1e9, eta

    def _bar(self, now: float, finished: bool) -> None:
        done_gb, total_gb, rate, eta = self._figures(now)
        bar = "#" * int(30 * min(self.done, self.total) / self.total)
        sys.stderr.write(f"\r[{bar:<30}] {done_gb:7.2f}/{total_gb:.2f} GB {rate:6.2f} GB/s ETA {eta:5.1f} s")
        if finished:
            sys.stderr.write("\n")


# -- the core -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """Bytes ``[start, start + nbytes)`` of tensor ``index``: the file ranges that hold them."""

    index: int
    start: int
    nbytes: int
    fd: int
    ranges: tuple[tuple[int, int], ...]


def ingest_into(
    slab: Slab,
    manifest: Manifest,
    sources: Sequence[Source],
    *,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
    chunk_bytes: int | None = None,
) -> list[int]:
    """Fill `slab` (laid out by `manifest`) from files; return the fingerprints in manifest order.

    ``sources[i]`` holds ``manifest.tensors[i]``: the same name, dtype and shape, checked first.
    `threads` reader threads; `progress` is called with the bytes of each chunk written (one call
    at a time). `chunk_bytes` (default by device) is rounded up to a multiple of BLOCK_BYTES.
    Errors: InvalidArgument for sources that do not match or files that end early.
    """
    threads = _check_threads(threads)
    specs = _check_sources(slab, manifest, sources)
    chunk = _chunk_size(slab, chunk_bytes)
    started = time.perf_counter()
    with _opened(sources) as fds:
        chunks = _plan_chunks(sources, fds, chunk)
        on_gpu = isinstance(slab, GpuSlab)  # then hash where the bytes land, in one batch
        shares = _run(slab, specs, sources, chunks, threads, chunk, progress, hash_chunks=not on_gpu)
    if on_gpu:
        fps = slab.fingerprints(manifest.offsets, manifest.sizes).tolist()  # type: ignore[union-attr]
    else:
        fps = [fingerprint_finish(share, spec.nbytes) for share, spec in zip(shares, specs, strict=True)]
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


def _check_threads(threads: object) -> int:
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS:
        raise InvalidArgument(f"threads must be an int in [1, {MAX_THREADS}], not {threads!r:.40}")
    return threads


def _ranges(source: Source) -> tuple[tuple[int, int], ...]:
    if isinstance(source, ShardPlan):
        return source.ranges
    return ((source.offset, source.nbytes),) if source.nbytes else ()


def _path(source: Source) -> str:
    return source.tensor.path if isinstance(source, ShardPlan) else source.path


def _check_sources(slab: Slab, manifest: Manifest, sources: Sequence[Source]) -> list[TensorSpec]:
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


def _chunk_size(slab: Slab, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        chunk_bytes = CUDA_CHUNK_BYTES if slab.device.startswith("cuda") else HOST_CHUNK_BYTES
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise InvalidArgument(f"chunk_bytes must be a positive int, not {chunk_bytes!r:.40}")
    return -(-chunk_bytes // BLOCK_BYTES) * BLOCK_BYTES


@contextmanager
def _opened(sources: Sequence[Source]) -> Iterator[dict[str, int]]:
    """Open every source file once, read-only; check each is long enough for its ranges."""
    ends: dict[str, int] = {}
    for src in sources:
        path = _path(src)
        ends[path] = max(ends.get(path, 0), max((off + n for off, n in _ranges(src)), default=0))
    fds: dict[str, int] = {}
    try:
        for path, end in ends.items():
            fd = fds[path] = _open(path)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger readahead window
            size = os.fstat(fd).st_size
            if size < end:
                raise InvalidArgument(f"{path}: {size} bytes, its tensors need {end} (truncated?)", path=path)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: the checkpoint file vanished", path=path) from None
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot open: {exc.strerror or exc}", path=path) from exc


def _plan_chunks(sources: Sequence[Source], fds: dict[str, int], chunk: int) -> list[_Chunk]:
    """Every chunk of every tensor, in file order (sequential reads for the disk)."""
    out: list[_Chunk] = []
    for index, src in enumerate(sources):
        out.extend(_split(index, fds[_path(src)], _ranges(src), chunk))
    out.sort(key=lambda c: (c.fd, c.ranges[0][0]))
    return out


def _split(index: int, fd: int, ranges: Sequence[tuple[int, int]], chunk: int) -> Iterator[_Chunk]:
    pieces: list[tuple[int, int]] = []
    start = filled = 0
    for offset, length in ranges:
        off, left = offset, length
        while left:
            take = min(left, chunk - filled)
            pieces.append((off, take))
            off, left, filled = off + take, left - take, filled + take
            if filled == chunk:
                yield _Chunk(index, start, filled, fd, tuple(pieces))
                start, filled, pieces = start + filled, 0, []
    if filled:
        yield _Chunk(index, start, filled, fd, tuple(pieces))


class _Target:
    """Where chunks land: read straight into a host slab's mapping at their final place; else
    staged, then an asynchronous copy on a CUDA stream into a GPU slab on this node, or the
    slab's own ``write_from`` (a remote slab)."""

    def __init__(self, slab: Slab, specs: list[TensorSpec]) -> None:
        self.slab, self.specs = slab, specs
        self.device = torch.device(slab.device) if isinstance(slab, GpuSlab) else None
        if self.device is not None and self.device.type != "cuda":
            self.device = None  # a tensor-backed slab in host memory: plain copies
        self.staged = not isinstance(slab, HostSlab)
        self.base = slab.base() if isinstance(slab, (HostSlab, GpuSlab)) else None

    def _at(self, chunk: _Chunk) -> int:
        return self.specs[chunk.index].offset + chunk.start

    def place(self, chunk: _Chunk) -> torch.Tensor:
        """The chunk's final bytes in a host slab (not staged)."""
        assert self.base is not None
        at = self._at(chunk)
        return self.base[at : at + chunk.nbytes]

    def write(self, chunk: _Chunk, buf: torch.Tensor, stream: Any) -> None:
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
    slab: Slab,
    specs: list[TensorSpec],
    sources: Sequence[Source],
    chunks: list[_Chunk],
    threads: int,
    chunk: int,
    progress: Callable[[int], None] | None,
    *,
    hash_chunks: bool = True,
) -> list[int]:
    """Read, fingerprint (if `hash_chunks`) and write every chunk with `threads` workers; the
    fingerprint shares."""
    shares = [0] * len(specs)
    for i, spec in enumerate(specs):  # empty tensors have no chunks
        if not spec.nbytes:
            shares[i] = fingerprint_part(torch.empty(0, dtype=torch.uint8), 0, 0)
    if not chunks:
        return shares
    target = _Target(slab, specs)
    threads = min(threads, len(chunks))
    size = min(chunk, max(c.nbytes for c in chunks))
    device = target.device
    # A GPU slab gets two staging buffers per thread: one being copied while the next is read.
    ring: queue.SimpleQueue[tuple[torch.Tensor, Any]] = queue.SimpleQueue()
    for _ in range((threads * 2 if device is not None else threads) if target.staged else 0):
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=device is not None)
        ring.put((buf, torch.cuda.Event() if device is not None else None))
    streams = [torch.cuda.Stream(device) for _ in range(threads)] if device is not None else [None] * threads
    work = iter(chunks)
    lock = threading.Lock()
    failed: list[BaseException] = []
    stop = threading.Event()

    def fill(c: _Chunk, view: torch.Tensor, junk: memoryview) -> int:
        """Read a chunk into `view`; its fingerprint share (while the bytes are in cache)."""
        _read_chunk(c, view.numpy().data, junk, sources[c.index])
        return fingerprint_part(view, c.start, specs[c.index].nbytes) if hash_chunks else 0

    def worker(stream: Any) -> None:
        junk = memoryview(bytearray(_GAP_BYTES))
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


def _read_chunk(c: _Chunk, dst: memoryview, junk: memoryview, source: Source) -> None:
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
                f"{_path(source)}: cannot read tensor {source.name!r}: {exc.strerror or exc}",
                path=_path(source),
                tensor=source.name,
            ) from exc
        if n <= 0:
            raise InvalidArgument(
                f"{_path(source)}: file ended at byte {offset + done} inside tensor {source.name!r} "
                "(truncated while loading?)",
                path=_path(source),
                tensor=source.name,
            )
        done += n
        while iovs and n >= len(iovs[0]):  # drop what a short read filled
            n -= len(iovs[0])
            iovs = iovs[1:]
        if n:
            iovs[0] = iovs[0][n:]


# -- client operations ----------------------------------------------------------------------------


def default_threads(device: str) -> int:
    """Reader threads for a load: 16 for GPUs, whose copies outrun a few readers (measured:
    16 threads reach 3.4x load_file(cuda) on an H200 host, 8 threads 2.4x); for host slabs,
    which the readers fill themselves, one per core up to 8 (on a 2-core VM, 2 threads loaded
    faster than 4 or 8, cold and warm)."""
    return 16 if device.startswith("cuda") else max(2, min(8, os.cpu_count() or 2))


def load_checkpoint(
    client: Client,
    path: str | Path,
    name: str,
    *,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
) -> tuple[int, int]:
    """Load a .safetensors file or a Hugging Face directory as the next version of `name`.

    Every header and file is validated before anything is reserved; the version appears only
    when every byte is written. Returns (version, bytes of tensor data).
    """
    check_name(name)
    threads = default_threads(device) if threads is None else threads
    _check_threads(threads)
    tensors = read_checkpoint(path)
    with _opened(tensors):  # every file opens and is long enough, before reserving
        pass
    specs = {t.name: (t.dtype, t.shape) for t in tensors}
    total = sum(t.nbytes for t in tensors)
    bar = Progress(total, progress, label=name)
    origin = f"file:{os.path.abspath(path)}"
    with client.reserve(name, specs, device=device, origin=origin) as reservation:
        _fill(reservation, tensors, threads, bar)
        return reservation.commit(), total


def load_sharded(
    client: Client,
    path: str | Path,
    name: str,
    *,
    tp: int,
    rules: ShardRules,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
) -> list[tuple[str, int]]:
    """Load a checkpoint split for tensor parallelism: sets ``name/tp0`` … ``name/tp{tp-1}``.

    Every tensor is planned for every rank first (a dim that does not divide fails here);
    then every rank is reserved and written, and only then are they committed. On failure the
    reservations not yet committed are aborted. Returns [(set name, version)] by rank.
    """
    check_name(name)
    threads = default_threads(device) if threads is None else threads
    _check_threads(threads)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise InvalidArgument(f"tp must be a positive int, not {tp!r:.40}")
    if not isinstance(rules, ShardRules):
        raise InvalidArgument("rules must be ShardRules (see tensord.sharding.load_rules)")
    names = [check_name(f"{name}/tp{rank}") for rank in range(tp)]
    tensors = read_checkpoint(path)
    plans = [plan_shards(tensors, rank, tp, rules) for rank in range(tp)]
    with _opened(tensors):
        pass
    total = sum(p.nbytes for rank in plans for p in rank)
    bar = Progress(total, progress, label=name)
    with ExitStack() as stack:  # aborts every reservation not committed, on any error
        reservations = [
            stack.enter_context(
                client.reserve(
                    n,
                    {p.name: (p.dtype, p.shape) for p in plans[rank]},
                    device=device,
                    origin=f"file:{os.path.abspath(path)}#rank={rank}&tp={tp}",
                )
            )
            for rank, n in enumerate(names)
        ]
        for reservation, rank in zip(reservations, plans, strict=True):
            _fill(reservation, rank, threads, bar)
        return [(n, r.commit()) for n, r in zip(names, reservations, strict=True)]


def _fill(reservation: Any, sources: Sequence[Source], threads: int, bar: Progress) -> None:
    """Ingest into a reservation and record its fingerprints."""
    manifest: Manifest = reservation.manifest
    by_name = {s.name: s for s in sources}
    ordered = [by_name.get(t.name) for t in manifest.tensors]
    if None in ordered or len(by_name) != len(ordered):
        raise InvalidArgument(f"the daemon's layout of {manifest.name} does not list the tensors asked for")
    fps = ingest_into(reservation.slab, manifest, ordered, threads=threads, progress=bar.advance)  # type: ignore[arg-type]
    reservation.written_all(np.arange(len(fps)), np.array(fps, dtype=np.uint64))


def export_set(client: Client, name: str, path: str | Path, *, version: int | None = None) -> int:
    """Write one version of a set to a .safetensors file, one tensor at a time; its version.

    The file appears atomically (see ``tensord.export``). Host replicas on this node are read
    through a mount, zero-copy; others one tensor at a time with ``get``.
    """
    info = client.info(check_name(name), version, tensors=True)
    v = int(info["version"])  # resolved once: every tensor comes from this version
    tensors: dict[str, Any] = info["tensors"]
    bad = [(k, t["dtype"]) for k, t in tensors.items() if t["dtype"] not in TENSORD_TO_SAFETENSORS]
    if bad:
        raise InvalidArgument(
            f"{name} v{v}: tensor {bad[0][0]!r} has dtype {bad[0][1]}, which safetensors cannot store",
            name=name,
            version=v,
            tensor=bad[0][0],
        )
    specs = [TensorSpec(k, t["dtype"], tuple(t["shape"])) for k, t in tensors.items()]
    metadata = {"format": "pt", "tensord.name": name, "tensord.version": str(v)}
    if info.get("device") == "cpu":
        with client.mount(name, v) as m:
            write_safetensors(path, lambda: ((k, m.tensors[k]) for k in tensors), metadata, specs=specs)
    else:

        def one_by_one() -> Iterator[tuple[str, torch.Tensor]]:
            for k in tensors:
                yield k, client.get(name, v, device="cpu", names=[k])[k]

        write_safetensors(path, one_by_one, metadata, specs=specs)
    return v
