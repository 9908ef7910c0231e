"""Many copies at once, described by tables of raw pointers (dst, src, bytes).

Reading, writing or checking a set of ~100,000 tensors must not cost one Python-level copy
per tensor (1-10 us each on a GPU host: a second per set). The tables are numpy arrays built
with vectorised arithmetic from a manifest's offsets and the tensors' data pointers, and
executed in bulk:

- GPU: two launches of a copy kernel shipped as PTX (`tensord_dataplane.kernel`: no compiler
  on the first call) over the whole table (large copies split into 1 MiB pieces, 16-byte units
  where addresses allow, tails bytewise); where it cannot load, the Triton kernel (compiled
  on first use), else the driver's cuMemcpyBatchAsync (CUDA 12.8+), else one cudaMemcpyAsync
  per entry. Either side may lie on another GPU of the process (peer access is enabled first).
  ``TENSORD_COPY_ENGINE=kernel|triton|driver`` forces one (for diagnosis). A table given again
  as the same read-only arrays (a plan's) is prepared and uploaded once (`copy_table`).
- Host: ``memmove`` through ctypes (it releases the GIL), large copies split into pieces and
  spread over the SDK's I/O threads.

Entries contiguous on both sides are merged first (`coalesce`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from tensord_contract.errors import InvalidArgument
from tensord_dataplane.kept import KeptByArrays

log = logging.getLogger(__name__)

PIECE = 1 << 20  # bytes one kernel program copies at most
_BIG = 1 << 20  # host copies from this size are cut into pieces of this size, run on I/O threads

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def threads() -> int:
    return min(32, max(2, os.cpu_count() or 2))


def pool() -> ThreadPoolExecutor:
    """The SDK's I/O threads (created on first use), one per core up to 32: copies into fresh
    memory are bound by page faults, which scale with threads; preadv and memmove release the GIL."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(threads(), thread_name_prefix="tensord-io")
        return _pool


def run_all(jobs: Sequence[Callable[[], object]]) -> None:
    """Run jobs on the I/O threads; wait for all; raise the first error."""
    if len(jobs) == 1:
        jobs[0]()
        return
    futures: list[Future[object]] = [pool().submit(job) for job in jobs]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def table(dst: Any, src: Any, sizes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three equal-length int64 arrays, empty entries dropped."""
    d, s, n = (np.asarray(a, dtype=np.int64) for a in (dst, src, sizes))
    if not d.shape == s.shape == n.shape or d.ndim != 1:
        raise InvalidArgument("a copy table needs three equal-length 1-d arrays")
    keep = n > 0
    if not keep.all():
        d, s, n = d[keep], s[keep], n[keep]
    return d, s, n


def coalesce(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge entries that are contiguous on both sides (in source order)."""
    if len(dst) < 2:
        return dst, src, sizes
    order = np.argsort(src, kind="stable")
    d, s, n = dst[order], src[order], sizes[order]
    start = np.ones(len(d), dtype=bool)
    start[1:] = (d[1:] != d[:-1] + n[:-1]) | (s[1:] != s[:-1] + n[:-1])
    if start.all():
        return d, s, n
    first = np.flatnonzero(start)
    return d[first], s[first], np.add.reduceat(n, first)


def split(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, piece: int = PIECE) -> tuple[np.ndarray, ...]:
    """Entries longer than `piece` cut into pieces of at most `piece` bytes."""
    count = np.maximum(1, -(-sizes // piece))
    if int(count.max(initial=1)) == 1:
        return dst, src, sizes
    row = np.repeat(np.arange(len(sizes)), count)
    k = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)
    skip = k * piece
    return dst[row] + skip, src[row] + skip, np.minimum(sizes[row] - skip, piece)


# -- host ------------------------------------------------------------------------------------------


def host_copy(dst: Any, src: Any, sizes: Any) -> None:
    """Copy between host pointers. Copies of 1 MiB and more are cut into pieces spread over the
    I/O threads (memmove releases the GIL); smaller ones run on the calling thread meanwhile,
    with the GIL held (releasing it per small copy makes threads fight over it)."""
    d, s, n = coalesce(*table(dst, src, sizes))
    if not len(n):
        return
    big = n >= _BIG
    jobs: list[Callable[[], object]] = []
    if big.any():
        bd, bs, bn = split(d[big], s[big], n[big], _BIG)
        workers = max(1, min(threads(), int(bn.sum()) // _BIG))
        group = (np.cumsum(bn) - bn) * workers // int(bn.sum())  # contiguous groups of about equal bytes
        bounds = np.searchsorted(group, np.arange(workers + 1))
        jobs = [
            functools.partial(_memmove_all, ctypes.memmove, bd[a:b].tolist(), bs[a:b].tolist(), bn[a:b].tolist())
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
            if b > a
        ]
    futures = [pool().submit(job) for job in jobs]
    small = ~big
    if small.any():
        _memmove_all(_memmove_holding_gil(), d[small].tolist(), s[small].tolist(), n[small].tolist())
    for f in futures:
        f.result()


def _memmove_all(move: Callable[[int, int, int], object], d: list[int], s: list[int], n: list[int]) -> None:
    for a, b, c in zip(d, s, n, strict=True):
        move(a, b, c)


@functools.cache
def _memmove_holding_gil() -> Callable[[int, int, int], object]:
    fn = ctypes.PyDLL(None).memmove
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


# -- GPU -------------------------------------------------------------------------------------------


def device_copy(dst: Any, src: Any, sizes: Any, device: Any, *, dst_base: int = 0, src_base: int = 0) -> None:
    """Copy between pointers a GPU can reach (its memory, or a peer's), asynchronously on the
    current stream of `device`, which runs the copy: ``sizes[i]`` bytes from ``src_base +
    src[i]`` to ``dst_base + dst[i]``. The caller synchronises before it relies on the bytes or
    frees either side. Read-only arrays passed again (a plan's) reuse their prepared table."""
    copy_table(dst, src, sizes).run(device, dst_base=dst_base, src_base=src_base)


#: a plan read through windows of a staging buffer has one per window: 80 for 20 GiB in 256
#: MiB windows (at 64, a remote load_into of such a set made all of them again each call)
_CACHED_TABLES = 1024
_tables: KeptByArrays[CopyTable] = KeptByArrays(_CACHED_TABLES)


def copy_table(dst: Any, src: Any, sizes: Any) -> CopyTable:
    """The prepared table of these columns: found again when the same read-only numpy arrays
    come back (their contents cannot have changed), else made now (and kept if read-only)."""
    return _tables.get((dst, src, sizes), lambda: CopyTable(dst, src, sizes))


class CopyTable:
    """A copy table prepared once (entries merged; for the GPU kernel cut into pieces, split
    into 16-byte and byte rows, uploaded to each GPU that runs it) and run against bases."""

    def __init__(self, dst: Any, src: Any, sizes: Any) -> None:
        self.dst, self.src, self.sizes = coalesce(*table(dst, src, sizes))
        self._rows: dict[Any, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        """(16-byte rows in units of 16, byte rows), each (dst, src, units) per row."""
        d, s, n = self.dst, self.src, self.sizes
        wide = ((d | s) & 15) == 0
        whole = np.where(wide, n // 16 * 16, 0)
        big = whole > 0
        wd, ws, wn = split(d[big], s[big], whole[big])
        tail = n - whole
        small = tail > 0
        bd, bs, bn = split(d[small] + whole[small], s[small] + whole[small], tail[small])
        return np.stack([wd, ws, wn // 16], axis=1), np.stack([bd, bs, bn], axis=1)

    def _uploaded(self, device: Any) -> tuple[Any, Any]:
        import torch

        with self._lock:
            if device not in self._rows:
                wide, narrow = self._split()
                self._rows[device] = (torch.from_numpy(wide).to(device), torch.from_numpy(narrow).to(device))
            return self._rows[device]

    def run(self, device: Any, *, dst_base: int = 0, src_base: int = 0) -> None:
        if not len(self.dst):
            return
        import torch

        from tensord_dataplane import kernel
        from tensord_dataplane.cuda import enable_peer_access

        device = torch.device(device)
        if torch.cuda.device_count() > 1:
            enable_peer_access()
        engine = os.environ.get("TENSORD_COPY_ENGINE", "auto")
        if engine not in ("auto", "kernel", "triton", "driver"):
            raise InvalidArgument(f"TENSORD_COPY_ENGINE={engine!r}: expected auto, kernel, triton or driver")
        with torch.cuda.device(device):
            index = torch.cuda.current_device()
            if engine in ("auto", "kernel") and (dst_base | src_base) & 15 == 0 and kernel.available(index):
                wide, narrow = self._uploaded(device)
                stream = torch.cuda.current_stream(device).cuda_stream
                kernel.launch(True, wide.data_ptr(), len(wide), dst_base, src_base, index, stream)
                kernel.launch(False, narrow.data_ptr(), len(narrow), dst_base, src_base, index, stream)
                return
            d, s, n = self.dst + dst_base, self.src + src_base, self.sizes
            if engine in ("auto", "triton") and _triton_copy(d, s, n, device):
                return
            _driver_copy(d, s, n, device)


def _driver_copy(d: np.ndarray, s: np.ndarray, n: np.ndarray, device: Any) -> None:
    """cuMemcpyBatchAsync (or cudaMemcpyAsync per entry) on a side stream ordered after the
    current one: the batch API refuses the legacy default stream torch uses."""
    import torch

    from tensord_dataplane.cuda import memcpy_table

    current = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(current)
    memcpy_table(d, s, n, side.cuda_stream)
    current.wait_stream(side)


@functools.cache
def _side_stream(device: Any) -> Any:
    import torch

    return torch.cuda.Stream(device)


_triton_broken: list[str] = []


def _triton_copy(d: np.ndarray, s: np.ndarray, n: np.ndarray, device: Any) -> bool:
    """Launch the pointer-table kernels; False where Triton cannot run here (logged once)."""
    if _triton_broken:
        return False
    kernels = _kernels()
    if kernels is None:
        _triton_broken.append("triton is not installed")
        return False
    import torch

    words, raw = kernels[:2]
    aligned = ((d | s | n) & 7) == 0
    try:
        for kernel, mask, unit in ((words, aligned, 8), (raw, ~aligned, 1)):
            if not mask.any():
                continue
            pd, ps, pn = split(d[mask], s[mask], n[mask])
            rows = torch.from_numpy(np.stack([pd, ps, pn // unit], axis=1)).to(device)
            kernel[(len(pn),)](rows, BLOCK=1024 if unit == 8 else 4096)
    except Exception as exc:  # no compiler, an unsupported GPU, ...: the driver path still works
        _triton_broken.append(f"{type(exc).__name__}: {exc}")
        log.warning("batched copies fall back to the CUDA driver: Triton failed (%s)", _triton_broken[0])
        return False
    return True


@functools.cache
def _kernels() -> tuple[Any, ...] | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def copy_words(rows, BLOCK: tl.constexpr):
        row = rows + tl.program_id(0).to(tl.int64) * 3
        dst = tl.load(row).to(tl.pointer_type(tl.int64))
        src = tl.load(row + 1).to(tl.pointer_type(tl.int64))
        n = tl.load(row + 2)
        for start in range(0, n, BLOCK):
            at = start + tl.arange(0, BLOCK)
            tl.store(dst + at, tl.load(src + at, mask=at < n), mask=at < n)

    @triton.jit
    def copy_bytes(rows, BLOCK: tl.constexpr):
        row = rows + tl.program_id(0).to(tl.int64) * 3
        dst = tl.load(row).to(tl.pointer_type(tl.uint8))
        src = tl.load(row + 1).to(tl.pointer_type(tl.uint8))
        n = tl.load(row + 2)
        for start in range(0, n, BLOCK):
            at = start + tl.arange(0, BLOCK)
            tl.store(dst + at, tl.load(src + at, mask=at < n), mask=at < n)

    return copy_words, copy_bytes


def engine_name() -> str:
    """Which GPU copy engine runs now (for logs and benchmarks)."""
    from tensord_dataplane import kernel

    engine = os.environ.get("TENSORD_COPY_ENGINE", "auto")
    if engine in ("auto", "kernel") and (kernel.loaded() or _loads_here()):
        return "kernel (PTX)"
    if engine == "driver" or _triton_broken or _kernels() is None:
        return "driver"
    return "triton"


def _loads_here() -> bool:
    """Whether the PTX kernel loads on the current GPU (none: False)."""
    import torch

    from tensord_dataplane import kernel

    if not torch.cuda.is_available():
        return False
    index = torch.cuda.current_device()
    with torch.cuda.device(index):
        return kernel.available(index)


# -- windows for copies between host and GPU memory ------------------------------------------------


def windows(offsets: np.ndarray, sizes: np.ndarray, limit: int = 256 << 20) -> list[tuple[np.ndarray, int, int]]:
    """Group entries (sorted by offset) into windows of about `limit` bytes of the slab: each is
    (entry indices, first byte, end byte); a tensor larger than `limit` is a window alone."""
    if not len(offsets):
        return []
    wid = (offsets - offsets[0]) // limit
    cuts = np.flatnonzero(np.diff(wid)) + 1
    out = []
    for idx in np.split(np.arange(len(offsets)), cuts):
        out.append((idx, int(offsets[idx[0]]), int((offsets[idx] + sizes[idx]).max())))
    return out


def runs(offsets: np.ndarray, sizes: np.ndarray, gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Ranges covering entries sorted by offset, merging neighbours closer than `gap` bytes
    (alignment padding, which no other tensor can occupy): (starts, ends)."""
    ends = offsets + sizes
    if not len(offsets):
        return offsets, ends
    start = np.ones(len(offsets), dtype=bool)
    start[1:] = offsets[1:] - ends[:-1] >= gap
    first = np.flatnonzero(start)
    return offsets[first], np.maximum.reduceat(ends, first)
