"""A slab on another node, read and written one-sided through this process's Transfer Engine.

Each batch registers the local memory it touches for its duration, one registration per
allocation (a `get` into one flat buffer needs one), moves one entry per contiguous run in one
engine batch (the engine merges entries contiguous on both sides, never across a registration
boundary), then unregisters. A batch's remote ranges all lie in the one registered slab.

Many scattered tensors (a `load_into` or `put` of thousands) go through a staging buffer
instead: each window of the slab (256 MiB to 1 GiB) moves as one engine entry, and the batched local
copy (`tensord_dataplane.copy`) scatters or gathers it. An engine entry costs microseconds and a
registration far more, so this beats one entry per tensor and one registration per target.
A read keeps its staging buffer registered while the transport lives (`_Stages`: two windows
of 256 MiB, up to 1 GiB for reads over 16 GiB: `window_for`) and alternates its halves, so the
engine fills one window while the copy scatters the previous one; a copy plan's windows and
their tables are prepared once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch

from tensord_contract.descriptors import RemoteReplica
from tensord_contract.errors import InvalidArgument, TransferError
from tensord_contract.manifest import ALIGN
from tensord_dataplane.copy import device_copy, host_copy, runs, windows
from tensord_dataplane.cuda import allocation_range, current
from tensord_dataplane.env import env_int
from tensord_dataplane.kept import KeptByArrays
from tensord_dataplane.slab import SlabAccess
from tensord_dataplane.transport.base import Batch, Transport

log = logging.getLogger(__name__)

DIRECT = 64  # up to this many tensors move as one engine entry each, straight to their place
_WINDOW = 256 << 20  # bytes of the slab one staged read moves per engine call, at least ...
_MAX_WINDOW = 1 << 30  # ... and at most: a sixteenth of what a read spans, between the two


def window_for(span: int) -> int:
    """Bytes of the slab one staged read of `span` bytes moves per engine call: an engine call
    costs ~0.5 ms beyond its bytes (nvlink_intra on an H100: 8 GiB in 256 MiB windows 20.8 ms,
    in 1 GiB windows 10.9 ms, in one call 6.6 ms), and the staging buffer (two windows, kept)
    stays within an eighth of the read. TENSORD_REMOTE_WINDOW_MB fixes it (a diagnostic)."""
    fixed = env_int("TENSORD_REMOTE_WINDOW_MB", 0, 1, 1 << 16)
    if fixed:
        return fixed << 20
    return min(_MAX_WINDOW, max(_WINDOW, (span // 16) >> 20 << 20))


class RemoteAccess(SlabAccess):
    def __init__(self, replica: RemoteReplica, transport: Transport) -> None:
        self.node, self.session, self.address = replica.node, replica.session, replica.address
        self.nbytes, self.generation, self.device = replica.nbytes, replica.generation, replica.device
        self._transport = transport

    def base(self) -> torch.Tensor:
        raise InvalidArgument(
            f"this set lies on node {self.node}: mount needs a replica on this node "
            "(use get or load_into, or replicate the set here first)"
        )

    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        ranges = [_range(dst)]
        self._move(self._transport.read, ranges, dst.data_ptr() + at, src, lengths)

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        if len(ptrs) <= DIRECT:
            self._move(self._transport.read, allocations(ptrs, sizes, device), ptrs, offsets, sizes)
            return
        parts = _parts(ptrs, offsets, sizes)

        def fill(at: int, part: Part) -> None:
            start, end = part[3], part[4]
            self._move(self._transport.read, [], np.array([at]), np.array([start]), np.array([end - start]))

        size = max(end - start for _, _, _, start, end in parts)
        read_through_stages(self._transport, device, size, parts, fill, lambda part: part[:3])

    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        if len(ptrs) <= DIRECT:
            self._move(self._transport.write, allocations(ptrs, sizes, device), ptrs, offsets, sizes)
            return
        with self._stage(offsets, sizes, device) as (stage, parts):
            for idx, start, _ in parts:
                _scatter(device, stage.data_ptr() + offsets[idx] - start, ptrs[idx], sizes[idx])
                firsts, ends = runs(offsets[idx], sizes[idx], ALIGN)  # never the bytes of other tensors
                local = stage.data_ptr() + firsts - start
                self._move(self._transport.write, [], local, firsts, ends - firsts)

    @contextlib.contextmanager
    def _stage(
        self, offsets: np.ndarray, sizes: np.ndarray, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, list[tuple[np.ndarray, int, int]]]]:
        """A staging buffer on `device` registered for the whole call, and the windows of the
        slab (entry indices into `offsets`, first byte, end byte) that pass through it."""
        order = np.argsort(offsets, kind="stable")
        parts = [(order[idx], start, end) for idx, start, end in windows(offsets[order], sizes[order])]
        stage = torch.empty(max(end - start for _, start, end in parts), dtype=torch.uint8, device=device)
        base, length, where = _range(stage)
        with current(where):
            self._transport.register(base, length)
        try:
            yield stage, parts
        finally:
            try:
                with current(where):
                    self._transport.unregister(base)
            except TransferError as exc:
                log.warning("%s", exc.message)

    def _move(
        self,
        call: Callable[[str, Batch], None],
        ranges: list[tuple[int, int, str]],
        local: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
    ) -> None:
        """One engine batch; `ranges` are registered for its duration (none: already are)."""
        if len(offsets) and int((offsets + sizes).max()) > self.nbytes:
            raise InvalidArgument(f"a copy reaches past the {self.nbytes}-byte slab on node {self.node}")
        registered: list[tuple[int, str]] = []
        try:
            for address, length, where in ranges:
                with current(where):
                    self._transport.register(address, length)
                registered.append((address, where))
            call(self.session, Batch(local, self.address + offsets, sizes))
        finally:
            for address, where in registered:
                try:
                    with current(where):
                        self._transport.unregister(address)
                except TransferError as exc:  # the bytes have moved; a leftover registration is harmless
                    log.warning("%s", exc.message)


Part = tuple[np.ndarray, np.ndarray, np.ndarray, int, int]
_parts_kept: KeptByArrays[list[Part]] = KeptByArrays(8)


def _parts(ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> list[Part]:
    """The windows of the slab a scattered read passes through: (targets, their offsets in the
    window, sizes, first byte, end byte), read-only, so the batched copy keeps each prepared.
    Found again for the same read-only arrays (a copy plan's)."""
    return _parts_kept.get((ptrs, offsets, sizes), lambda: _made_parts(ptrs, offsets, sizes))


def _made_parts(ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> list[Part]:
    order = np.argsort(offsets, kind="stable")
    parts: list[Part] = []
    span = int((offsets + sizes).max() - offsets.min()) if len(offsets) else 0
    for idx, start, end in windows(offsets[order], sizes[order], window_for(span)):
        rows = order[idx]
        cols = (ptrs[rows], offsets[rows] - start, sizes[rows])
        for c in cols:
            c.flags.writeable = False
        parts.append((*cols, start, end))
    return parts


class _Stages:
    """Staging buffers registered with a transport, kept between reads while it lives
    (registering costs far more than a read): one per device, in two halves, so the engine
    fills one while the batched copy scatters the other. One read uses it at a time; a read
    meanwhile stages through a buffer of its own, registered for the call."""

    def __init__(self) -> None:
        self._kept: weakref.WeakKeyDictionary[Transport, dict[str, tuple[torch.Tensor, int, str]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, transport: Transport, device: torch.device, half: int) -> Iterator[tuple[torch.Tensor, int]]:
        where = str(device)
        with self._lock:
            kept = self._kept.setdefault(transport, {}).pop(where, None)
        if kept is not None and kept[0].numel() < 2 * half:
            self._unregister(transport, kept)
            kept = None
        if kept is None:
            stage = torch.empty(2 * half, dtype=torch.uint8, device=device)
            base, length, at = _range(stage)
            with current(at):
                transport.register(base, length)
            kept = (stage, base, at)
        try:
            yield kept[0], 2
        except BaseException:
            self._unregister(transport, kept)
            raise
        if half > max(_MAX_WINDOW, window_for(0)):  # a window of one very large tensor: not worth keeping
            self._unregister(transport, kept)
            return
        with self._lock:
            mine = self._kept.setdefault(transport, {})
            other = mine.pop(where, None)
            mine[where] = kept
        if other is not None:
            self._unregister(transport, other)

    @staticmethod
    def _unregister(transport: Transport, kept: tuple[torch.Tensor, int, str]) -> None:
        try:
            with current(kept[2]):
                transport.unregister(kept[1])
        except TransferError as exc:
            log.warning("%s", exc.message)


_stages = _Stages()


W = TypeVar("W")


def read_through_stages(
    transport: Transport,
    device: torch.device,
    size: int,
    windows: Sequence[W],
    fill: Callable[[int, W], None],
    pieces: Callable[[W], tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Windows of at most `size` bytes read through the kept staging buffer: `fill(at, w)` has
    the engine write window `w` at `at`, in one half; then its `pieces(w)` (targets, offsets in
    the window, sizes) are scattered by the batched copy while the engine fills the other half."""
    with _stages.use(transport, device, size) as (stage, halves):
        done: list[torch.cuda.Event | None] = [None, None]
        for k, w in enumerate(windows):
            half = k % halves
            if (event := done[half]) is not None:
                event.synchronize()  # its last scatter has read the half
            at = stage.data_ptr() + half * size
            fill(at, w)
            dst, rel, n = pieces(w)
            if device.type == "cuda":
                device_copy(dst, rel, n, device, src_base=at)
                done[half] = torch.cuda.Event()
                done[half].record(torch.cuda.current_stream(device))  # type: ignore[union-attr]
            else:
                host_copy(dst, at + rel, n)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


def _scatter(device: torch.device, dst: np.ndarray, src: np.ndarray, sizes: np.ndarray) -> None:
    """One batched local copy, finished before the staging buffer is used again."""
    if device.type == "cuda":
        device_copy(dst, src, sizes, device)
        torch.cuda.current_stream(device).synchronize()
    else:
        host_copy(dst, src, sizes)


def _range(t: torch.Tensor) -> tuple[int, int, str]:
    """The range to register for a tensor: its storage on the host, its allocation on a GPU."""
    if t.device.type == "cuda":
        base, size = allocation_range(t.data_ptr(), t.device.index or 0)
        return base, size, str(t.device)
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes(), "cpu"


def allocations(ptrs: np.ndarray, sizes: np.ndarray, device: torch.device) -> list[tuple[int, int, str]]:
    """The allocations holding buffers at `ptrs` on `device`: on a GPU, whole CUDA allocations
    (asked once per allocation, not per tensor); on the host, merged page-aligned ranges."""
    keep = sizes > 0
    ptrs, sizes = ptrs[keep], sizes[keep]
    order = np.argsort(ptrs)
    ptrs, ends = ptrs[order], ptrs[order] + sizes[order]
    out: list[tuple[int, int, str]] = []
    if device.type == "cuda":
        i = 0
        while i < len(ptrs):
            base, size = allocation_range(int(ptrs[i]), device.index or 0)
            out.append((base, size, str(device)))
            i = int(np.searchsorted(ptrs, base + size, side="left"))
        return out
    page = 4096
    starts, stops = ptrs // page * page, -(-ends // page) * page
    if len(starts):
        fresh = np.ones(len(starts), dtype=bool)
        fresh[1:] = starts[1:] > np.maximum.accumulate(stops)[:-1]
        first = np.flatnonzero(fresh)
        tops = np.maximum.reduceat(stops, first)
        out = [(int(a), int(b - a), "cpu") for a, b in zip(starts[first], tops, strict=True)]
    return out
