"""A host slab on this node, seen by a client (or by the daemon itself): a memfd.

Reads copy with preadv(2) straight into their destination (one copy, no page table of the
source to fill): into one flat buffer as a few large reads spread over threads, into many
scattered tensors as one system call per ~1,000 tensors (a vector of their addresses, padding
between tensors read into a scratch buffer). Mounts map the file copy-on-write, so a client
writing through a mount never changes what others read. A writer fills its reservation through
a shared mapping that `finish()` drops (the daemon can only seal a slab nobody maps writable;
huge-page slabs take no write() at all). Copies to and from GPU memory of a slab the daemon
marks pinned go through a page-locked mapping as a few large DMA copies (`tensord_dataplane.
pinned`); others go through the mapping in windows of 256 MiB.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading

import numpy as np
import torch

from tensord_contract.errors import TransferError
from tensord_contract.manifest import ALIGN
from tensord_dataplane import host_dma
from tensord_dataplane import pinned as pinning
from tensord_dataplane.copy import device_copy, host_copy, run_all, runs, windows
from tensord_dataplane.fingerprint import FINGERPRINT_VERSION, slab_fingerprints
from tensord_dataplane.kept import KeptByArrays
from tensord_dataplane.mapping import MAP_NORESERVE, Mapping, map_size, preadv
from tensord_dataplane.slab import SlabAccess

_CHUNK = 32 << 20  # flat reads are split into jobs of this size
_JUNK = 64 << 10  # a gap up to this size between two tensors is read into scratch memory
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
_FEW_RUNS = 16  # up to this many runs into one GPU buffer: one DMA copy each, no stage


class HostAccess(SlabAccess):
    def __init__(
        self, fd: int, nbytes: int, generation: int = 0, *, writable: bool = False, pinned: bool = False
    ) -> None:
        """`pinned`: the daemon lets clients page-lock this slab (its pinned_host budget)."""
        self.fd, self.nbytes, self.generation, self.device = fd, nbytes, generation, "cpu"
        self._writable, self.pinned = writable, pinned
        self._registration: pinning.Registration | None = None  # page-locked while copying to GPUs
        self._gpus: set[torch.device] = set()  # where pinned copies were queued: synced by finish()
        self._written: list[tuple[np.ndarray, np.ndarray]] = []  # (offsets, fingerprints) of pinned writes
        self._size = map_size(fd, nbytes)
        self._base: torch.Tensor | None = None
        self._mapping: Mapping | None = None
        self._lock = threading.Lock()

    def base(self) -> torch.Tensor:
        with self._lock:
            if self._base is None:
                if self._writable:
                    self._mapping = Mapping(self.fd, self._size, writable=True)
                    self._base = self._mapping.tensor()
                else:  # copy-on-write, which the write seal allows; lives as long as its views
                    flags = mmap.MAP_PRIVATE | MAP_NORESERVE
                    mm = mmap.mmap(self.fd, self._size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    self._base = torch.frombuffer(mm, dtype=torch.uint8)
            return self._base

    # -- reads --------------------------------------------------------------------------------------
    def _route(self, device: torch.device) -> tuple[bool, pinning.Registration | None]:
        """Whether copies with `device` go as large DMA copies (`host_dma`), and the page-locked
        mapping they use (None: bounce buffers)."""
        mode = pinning.mode()
        if device.type != "cuda" or mode == "pageable":
            return False, None
        with self._lock:
            self._gpus.add(device)
            if self.pinned and mode != "bounce" and self._registration is None:
                if self._writable:
                    try:
                        self._registration = pinning.register(self.fd, self._size, writable=True)
                    except (OSError, TransferError) as exc:
                        pinning.log.warning("a put into a host slab goes through bounce buffers: %s", exc)
                        self.pinned = False
                else:
                    self._registration = pinning.registrations.acquire(self.fd, self._size, self.generation)
                    self.pinned = self._registration is not None
            return True, self._registration

    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        fast, reg = self._route(dst.device)
        if fast and (reg is None or len(src) > _FEW_RUNS):
            host_dma.read(reg, self.fd, dst.data_ptr() + at, src, lengths, dst.device)
            return
        if dst.device.type != "cpu":
            base = self.base() if reg is None else reg.host()
            for s, d, n in zip(src.tolist(), at.tolist(), lengths.tolist(), strict=True):
                dst[d : d + n].copy_(base[s : s + n], non_blocking=reg is not None)
            return
        ptr = dst.data_ptr()
        jobs, small = [], []
        for s, d, n in zip(src.tolist(), at.tolist(), lengths.tolist(), strict=True):
            if n < _CHUNK:
                small.append((ptr + d, n, s))
                continue
            for a in range(0, n, _CHUNK):
                jobs.append(functools.partial(self._pread, [(ptr + d + a, min(_CHUNK, n - a), s + a)]))
        if small:
            jobs.append(functools.partial(self._pread, small))
        run_all(jobs)

    def _pread(self, parts: list[tuple[int, int, int]]) -> None:
        for address, length, offset in parts:
            preadv(self.fd, np.array([[address, length]], dtype=np.int64), offset)

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        if device.type == "cuda":
            fast, reg = self._route(device)
            if fast:
                host_dma.read(reg, self.fd, ptrs, offsets, sizes, device)
            else:
                self._staged_read(ptrs, offsets, sizes, device)
            return
        run_all([functools.partial(_read_calls, self.fd, job) for job in _scatter_jobs(ptrs, offsets, sizes)])

    def _staged_read(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        """Through the mapping: a window of the slab to the GPU, then scattered there."""
        base, order = self.base(), np.argsort(offsets, kind="stable")
        ptrs, offsets, sizes = ptrs[order], offsets[order], sizes[order]
        for idx, start, end in windows(offsets, sizes):
            stage = torch.empty(end - start, dtype=torch.uint8, device=device)
            stage.copy_(base[start:end])
            device_copy(ptrs[idx], stage.data_ptr() + offsets[idx] - start, sizes[idx], device)
            torch.cuda.current_stream(device).synchronize()  # before the stage is reused

    # -- writes -------------------------------------------------------------------------------------
    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        fast, reg = self._route(device)
        if fast:
            address = self.base().data_ptr() if reg is None else 0
            self._written.append(host_dma.write(reg, address, ptrs, offsets, sizes, device))
            return
        self._written.clear()  # fingerprints of earlier writes may no longer hold
        base = self.base()
        if device.type != "cuda":
            host_copy(base.data_ptr() + offsets, ptrs, sizes)
            return
        order = np.argsort(offsets, kind="stable")
        ptrs, offsets, sizes = ptrs[order], offsets[order], sizes[order]
        for idx, start, end in windows(offsets, sizes):
            stage = torch.empty(end - start, dtype=torch.uint8, device=device)
            device_copy(stage.data_ptr() + offsets[idx] - start, ptrs[idx], sizes[idx], device)
            firsts, ends = runs(offsets[idx], sizes[idx], ALIGN)  # never the bytes of other tensors
            for a, b in zip(firsts.tolist(), ends.tolist(), strict=True):
                base[a:b].copy_(stage[a - start : b - start])

    def fingerprints(self, offsets: np.ndarray, sizes: np.ndarray, version: int = 0) -> np.ndarray:
        version = version or FINGERPRINT_VERSION
        known = _known(self._written, offsets, sizes) if version == FINGERPRINT_VERSION else None
        if known is not None:  # computed on the GPU while the pinned writes went down
            return known
        return slab_fingerprints(self.base()[: self.nbytes], offsets, sizes, version=version)

    def finish(self) -> None:
        """Wait for pinned copies and drop the page-locked mapping; drop a writer's mapping (its
        views become invalid): the slab can then be sealed."""
        with self._lock:
            gpus, self._gpus = self._gpus, set()
            reg, self._registration = self._registration, None
        for device in gpus:
            torch.cuda.synchronize(device)
        if reg is not None and self._writable:
            pinning.unregister(reg)
        elif reg is not None:
            pinning.registrations.release(reg)
        with self._lock:
            if self._mapping is not None:
                self._base = None
                self._mapping.close()
                self._mapping = None

    def close(self) -> None:
        self.finish()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _known(written: list[tuple[np.ndarray, np.ndarray]], offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray | None:
    """Fingerprints of tensors at `offsets` that pinned writes computed (empty tensors: 0), or
    None unless every non-empty one was written that way."""
    if not written:
        return None
    at = np.concatenate([w[0] for w in written])
    fps = np.concatenate([w[1] for w in written])
    order = np.argsort(at, kind="stable")
    at, fps = at[order], fps[order]
    i = np.minimum(np.searchsorted(at, offsets), max(len(at) - 1, 0))
    empty = sizes == 0
    if len(at) == 0 or not np.all(empty | (at[i] == offsets)):
        return None
    return np.where(empty, np.uint64(0), fps[i]).astype(np.uint64)


def _jobs(sizes: np.ndarray) -> int:
    from tensord_dataplane.copy import threads

    return max(1, min(threads(), int(sizes.sum()) // _CHUNK))


Call = tuple[np.ndarray, int]  # a preadv call: its (address, length) vector and the file offset
_jobs_kept: KeptByArrays[list[list[Call]]] = KeptByArrays(16)  # scattered reads' calls (plans' arrays)


def _scatter_jobs(ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> list[list[Call]]:
    """The preadv calls of a scattered read, one list per I/O thread; found again when the
    same read-only arrays come back (a plan's, whose contents cannot change), as copy tables
    are (`tensord_dataplane.copy.copy_table`)."""
    return _jobs_kept.get((ptrs, offsets, sizes), lambda: _made_jobs(ptrs, offsets, sizes))


def _made_jobs(ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> list[list[Call]]:
    order = np.argsort(offsets, kind="stable")
    calls = _scatter_calls(ptrs[order], offsets[order], sizes[order])
    k = _jobs(sizes)
    calls = _balanced(calls, max(_CHUNK, -(-int(sizes.sum()) // k)))
    return [calls[i::k] for i in range(min(k, len(calls)))]


def _scatter_calls(ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """preadv calls that fill tensors at `ptrs` from slab `offsets` (sorted): each call is an
    iovec array (address, length) of neighbouring tensors and the file offset it starts at."""
    keep = sizes > 0
    ptrs, offsets, sizes = ptrs[keep], offsets[keep], sizes[keep]
    if not len(ptrs):
        return []
    gaps = np.zeros(len(ptrs), dtype=np.int64)
    gaps[1:] = offsets[1:] - offsets[:-1] - sizes[:-1]
    fresh = np.ones(len(ptrs), dtype=bool)
    fresh[1:] = gaps[1:] > _JUNK
    gaps[fresh] = 0
    junk = _junk().data_ptr()
    iov = np.empty((2 * len(ptrs), 2), dtype=np.int64)
    iov[0::2, 0], iov[0::2, 1] = junk, gaps
    iov[1::2, 0], iov[1::2, 1] = ptrs, sizes
    call_of = np.repeat(np.cumsum(fresh) - 1, 2)
    keep_iov = iov[:, 1] > 0
    iov, call_of = iov[keep_iov], call_of[keep_iov]
    starts = offsets[fresh]
    out: list[tuple[np.ndarray, int]] = []
    for c, part in zip(np.unique(call_of).tolist(), np.split(iov, np.flatnonzero(np.diff(call_of)) + 1), strict=True):
        at = int(starts[c])
        for a in range(0, len(part), _IOV_MAX):
            piece = part[a : a + _IOV_MAX]
            out.append((piece, at))
            at += int(piece[:, 1].sum())
    return out


def _balanced(calls: list[tuple[np.ndarray, int]], limit: int) -> list[tuple[np.ndarray, int]]:
    """The same reads cut into calls of about `limit` bytes, so that the I/O threads share them
    (neighbouring tensors make one call: a set of a few hundred large tensors would otherwise be
    read by one thread)."""
    out: list[tuple[np.ndarray, int]] = []
    for iov, at in calls:
        lengths = iov[:, 1]
        if int(lengths.sum()) <= limit:
            out.append((iov, at))
            continue
        if int(lengths.max()) > limit:  # cut large tensors (never the scratch entries: <= _JUNK)
            rows = [(address + a, min(limit, n - a)) for address, n in iov.tolist() for a in range(0, n, limit)]
            iov = np.array(rows, dtype=np.int64)
            lengths = iov[:, 1]
        ends = np.cumsum(lengths)
        group = (ends - lengths) // limit
        cuts = np.flatnonzero(np.diff(group)) + 1
        starts = at + np.concatenate([[0], ends[cuts - 1]])
        out.extend(zip(np.split(iov, cuts), starts.tolist(), strict=True))
    return out


def _read_calls(fd: int, calls: list[tuple[np.ndarray, int]]) -> None:
    for iov, offset in calls:
        preadv(fd, iov, offset)


@functools.cache
def _junk() -> torch.Tensor:
    return torch.empty(_JUNK, dtype=torch.uint8)
