"""Copies between a host slab and GPU memory as a few large DMA copies.

The slab is cut into windows of ~128 MiB (tensors split at window size for reads). A read
copies each window to a GPU stage on one stream while a second stream scatters the previous
window into its tensors with the batched copy kernel (queued after the next window's copy: the
scatter's table upload waits on the calling thread); a window of one tensor (a piece of a
large one) goes straight into place. A write gathers each window's tensors into a GPU stage,
fingerprints them there (the bytes the slab receives), and copies the stage to the slab.

The host side is either the slab's own mapping, page-locked in this process (`pinned.
Registration`: the DMA engine reads or writes the slab directly), or, where it may not be
page-locked, two bounce buffers of pinned memory of this process, filled by threads with preadv
from the slab's file (emptied by threads into the writer's mapping) while the GPU moves the other.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import torch

from tensord_contract.manifest import ALIGN
from tensord_dataplane.copy import device_copy, host_copy, run_all, runs, split, threads, windows
from tensord_dataplane.cuda import memcpy_async
from tensord_dataplane.fingerprint import BLOCK_BYTES, slab_fingerprints
from tensord_dataplane.mapping import preadv
from tensord_dataplane.pinned import Registration, mode

WINDOW = 128 << 20  # bytes of the slab one staged copy moves
_PART = 4 << 20  # bounce buffers are filled and emptied by threads in parts of at least this

_bounce_lock = threading.Lock()  # one bounced copy at a time per process: they share the buffers
_bounce: list[torch.Tensor] = []


@functools.cache
def _streams(device: torch.device) -> tuple[Any, Any]:
    """(copy stream, kernel stream) of a GPU: DMA copies on one, gathers and scatters on the other."""
    return torch.cuda.Stream(device), torch.cuda.Stream(device)


def _rounded(n: int) -> int:
    return -(-n // BLOCK_BYTES) * BLOCK_BYTES


def _gpu_stages(span: int, count: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.empty(_rounded(span), dtype=torch.uint8, device=device) for _ in range(count)]


def _bounce_buffers(span: int) -> list[torch.Tensor]:
    """The process's two pinned host buffers, grown to `span` bytes (held under `_bounce_lock`)."""
    if not _bounce or _bounce[0].numel() < span:
        _bounce[:] = []
        _bounce.extend(torch.empty(_rounded(span), dtype=torch.uint8, pin_memory=True) for _ in range(2))
    return _bounce


def _sorted(ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(offsets, kind="stable")
    order = order[sizes[order] > 0]
    return ptrs[order], offsets[order], sizes[order]


# -- reads -----------------------------------------------------------------------------------------


def read(
    reg: Registration | None, fd: int, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device
) -> None:
    """Copy slab bytes (`offsets`, `sizes`) to GPU addresses `ptrs`: from the registered mapping
    `reg`, or through bounce buffers read from `fd`. Queued on `device` (its current stream
    waits for them); the caller synchronises before it gives `reg` up."""
    ptrs, offsets, sizes = _sorted(ptrs, offsets, sizes)
    ptrs, offsets, sizes = split(ptrs, offsets, sizes, WINDOW)
    if not len(sizes):
        return
    if reg is not None and mode() == "direct":
        device_copy(ptrs, reg.device_address + offsets, sizes, device)
        return
    parts = windows(offsets, sizes, WINDOW)
    span = max(end - start for _, start, end in parts)
    current = torch.cuda.current_stream(device)
    copier, scatterer = _streams(device)
    copier.wait_stream(current)
    scatterer.wait_stream(current)
    stages = _gpu_stages(span, min(2, len(parts)), device)
    gpu_free: list[Any] = [None, None]
    host_free: list[Any] = [None, None]
    waiting: tuple[np.ndarray, int, int, Any] | None = None  # a window copied to a stage, not yet scattered
    lock = _bounce_lock if reg is None else threading.Lock()
    with lock, torch.cuda.device(device):
        bounce = _bounce_buffers(span) if reg is None else []
        host = reg.host() if reg is not None else None
        for i, (idx, start, end) in enumerate(parts):
            k = i % 2
            if reg is None or host is None:
                if host_free[k] is not None:
                    host_free[k].synchronize()  # the GPU has taken what this buffer held
                _fill(fd, bounce[k], start, end - start)
                address, src = bounce[k].data_ptr(), bounce[k][: end - start]
            else:
                address, src = reg.device_address + start, host[start:end]
            if len(idx) == 1:  # one tensor (or a piece of one): straight into place
                memcpy_async(int(ptrs[idx[0]]), address, int(sizes[idx[0]]), copier.cuda_stream)
                host_free[k] = copier.record_event()
            else:
                with torch.cuda.stream(copier):
                    if gpu_free[k] is not None:
                        copier.wait_event(gpu_free[k])
                    stages[k][: end - start].copy_(src, non_blocking=True)
                    host_free[k] = copier.record_event()
            # The previous window's scatter waits (on this thread) for its DMA to end: queue it
            # only now, after this window's DMA, so that the copy engine never idles meanwhile.
            if waiting is not None:
                gpu_free[waiting[1]] = _scatter(scatterer, stages, ptrs, offsets, sizes, *waiting, device)
            waiting = (idx, k, start, host_free[k]) if len(idx) > 1 else None
        if waiting is not None:
            gpu_free[waiting[1]] = _scatter(scatterer, stages, ptrs, offsets, sizes, *waiting, device)
        if reg is None:  # the bounce buffers are free again only when the last copies are done
            copier.synchronize()
    current.wait_stream(copier)
    current.wait_stream(scatterer)


def _scatter(
    scatterer: Any,
    stages: list[torch.Tensor],
    ptrs: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    idx: np.ndarray,
    k: int,
    start: int,
    filled: Any,
    device: torch.device,
) -> Any:
    """Scatter a window from stage `k` (once `filled`) into its tensors; the event that frees the stage."""
    scatterer.wait_event(filled)
    with torch.cuda.stream(scatterer):
        device_copy(ptrs[idx], stages[k].data_ptr() + offsets[idx] - start, sizes[idx], device)
        return scatterer.record_event()


def _fill(fd: int, buf: torch.Tensor, offset: int, nbytes: int) -> None:
    """preadv `nbytes` of the slab file at `offset` into `buf`, spread over the I/O threads."""
    step = max(_PART, -(-nbytes // threads()))
    base = buf.data_ptr()
    jobs = [
        functools.partial(preadv, fd, np.array([[base + a, min(step, nbytes - a)]], dtype=np.int64), offset + a)
        for a in range(0, nbytes, step)
    ]
    run_all(jobs)


# -- writes ----------------------------------------------------------------------------------------


def write(
    reg: Registration | None,
    address: int,
    ptrs: np.ndarray,
    offsets: np.ndarray,
    sizes: np.ndarray,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Copy GPU tensors at `ptrs` to slab `offsets`, into the registered mapping `reg` or
    through bounce buffers copied to the writer's mapping at `address`, and wait for the
    copies. Returns the offsets and fingerprints of the non-empty tensors written (computed on
    the GPU from the bytes copied)."""
    ptrs, offsets, sizes = _sorted(ptrs, offsets, sizes)
    fps = np.empty(len(offsets), dtype=np.uint64)
    if not len(sizes):
        return offsets, fps
    parts = windows(offsets, sizes, WINDOW)
    span = max(end - start for _, start, end in parts)
    current = torch.cuda.current_stream(device)
    copier, gatherer = _streams(device)
    gatherer.wait_stream(current)
    stages = _gpu_stages(span, min(2, len(parts)), device)
    free: list[Any] = [None, None]
    pending: tuple[Any, int, torch.Tensor, int, np.ndarray, np.ndarray] | None = None
    lock = _bounce_lock if reg is None else threading.Lock()
    with lock, torch.cuda.device(device):
        bounce = _bounce_buffers(span) if reg is None else []
        for i, (idx, start, end) in enumerate(parts):
            k = i % 2
            stage = stages[k][: _rounded(end - start)]
            with torch.cuda.stream(gatherer):
                if free[k] is not None:
                    gatherer.wait_event(free[k])
                device_copy(stage.data_ptr() + offsets[idx] - start, ptrs[idx], sizes[idx], device)
                fps[idx] = slab_fingerprints(stage, offsets[idx] - start, sizes[idx])  # waits for the gather
                gathered = gatherer.record_event()
            firsts, ends = runs(offsets[idx], sizes[idx], ALIGN)  # never the bytes of other tensors
            copier.wait_event(gathered)
            with torch.cuda.stream(copier):
                if reg is None:
                    bounce[k][: end - start].copy_(stages[k][: end - start], non_blocking=True)
                else:
                    host = reg.host()
                    for a, b in zip(firsts.tolist(), ends.tolist(), strict=True):
                        host[a:b].copy_(stages[k][a - start : b - start], non_blocking=True)
                free[k] = copier.record_event()
            if pending is not None:  # the previous window's bytes go to the file meanwhile
                _drain(*pending)
            pending = (free[k], address, bounce[k], start, firsts, ends) if reg is None else None
        if pending is not None:
            _drain(*pending)
        copier.synchronize()
    current.wait_stream(gatherer)
    return offsets, fps


def _drain(copied: Any, address: int, buf: torch.Tensor, start: int, firsts: np.ndarray, ends: np.ndarray) -> None:
    """Once `copied` has happened, copy the slab runs `[firsts, ends)` from `buf` (which holds
    the window from slab offset `start`) to the slab mapped at `address`, on the I/O threads."""
    copied.synchronize()
    host_copy(address + firsts, buf.data_ptr() + firsts - start, ends - firsts)
