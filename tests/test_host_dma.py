"""The stream ordering of `tensord_dataplane.host_dma` without a GPU: CUDA streams and events are
replaced by lazy queues whose copies run only when an event or a stream is waited for (the copy
stream, optionally, as early as it may), and stages and bounce buffers start as filler. A copy
ordered wrongly (a stage or a bounce buffer refilled before it was drained) yields wrong bytes.
The real copies on a GPU: tests/test_pinned_gpu.py."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch

from tensord_dataplane import host_dma, pinned
from tensord_dataplane.copy import host_copy
from tensord_dataplane.fingerprint import fingerprints, slab_fingerprints
from tensord_dataplane.mapping import Mapping


class _Event:
    def __init__(self, stream: _Stream) -> None:
        self.done, self.stream = False, stream

    def synchronize(self) -> None:
        self.stream.run_until(self)


class _Stream:
    def __init__(self, number: int, eager: bool = False) -> None:
        self.queue: list[tuple[str, Any]] = []
        self.cuda_stream, self.eager = number, eager

    def wait_stream(self, other: _Stream) -> None:
        self.wait_event(other.record_event())

    def wait_event(self, event: _Event) -> None:
        self.queue.append(("wait", event))

    def record_event(self) -> _Event:
        event = _Event(self)
        self.queue.append(("record", event))
        self._run_eagerly()
        return event

    def enqueue(self, fn: Callable[[], object]) -> None:
        self.queue.append(("run", fn))
        self._run_eagerly()

    def _run_eagerly(self) -> None:
        while self.eager and self.queue and not (self.queue[0][0] == "wait" and not self.queue[0][1].done):
            self._step()

    def _step(self) -> None:
        kind, what = self.queue[0]
        if kind == "wait" and not what.done:
            what.stream.run_until(what)
        self.queue.pop(0)
        if kind == "record":
            what.done = True
        elif kind == "run":
            what()

    def run_until(self, event: _Event) -> None:
        while not event.done:
            self._step()

    def synchronize(self) -> None:
        while self.queue:
            self._step()


@pytest.fixture(params=[False, True], ids=["lazy", "eager-copies"])
def streams(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> list[_Stream]:
    default, copier, kernels = _Stream(1), _Stream(2, eager=request.param), _Stream(3)
    every = [default, copier, kernels]
    current = [default]
    kept: list[Any] = []  # CUDA's caching allocator reuses a freed stage only after pending work

    @contextlib.contextmanager
    def use(stream: _Stream) -> Iterator[None]:
        before, current[0] = current[0], stream
        try:
            yield
        finally:
            current[0] = before

    def device_copy(d: Any, s: Any, n: Any, device: Any) -> None:
        current[0].synchronize()  # the real one uploads its table with a blocking copy
        d, s, n = np.array(d), np.array(s), np.array(n)
        current[0].enqueue(lambda: host_copy(d, s, n))

    def memcpy_async(d: int, s: int, n: int, stream: int) -> None:
        every[stream - 1].enqueue(lambda: host_copy([d], [s], [n]))

    real_copy = torch.Tensor.copy_

    def copy_(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        current[0].enqueue(lambda: real_copy(self, src))
        if not non_blocking:
            current[0].synchronize()
        return self

    def fingerprints_now(buf: torch.Tensor, offsets: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        current[0].synchronize()  # the real one reads its result back
        return slab_fingerprints(buf, offsets, sizes)

    def stages(span: int, count: int, device: Any) -> list[torch.Tensor]:
        out = [torch.full((host_dma._rounded(span),), 7, dtype=torch.uint8) for _ in range(count)]
        kept.append(out)
        return out

    def bounce(span: int) -> list[torch.Tensor]:
        return [torch.full((host_dma._rounded(span),), 9, dtype=torch.uint8) for _ in range(2)]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[0])
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    monkeypatch.setattr(host_dma, "_streams", lambda device: (copier, kernels))
    monkeypatch.setattr(host_dma, "device_copy", device_copy)
    monkeypatch.setattr(host_dma, "memcpy_async", memcpy_async)
    monkeypatch.setattr(host_dma, "slab_fingerprints", fingerprints_now)
    monkeypatch.setattr(host_dma, "_gpu_stages", stages)
    monkeypatch.setattr(host_dma, "_bounce_buffers", bounce)
    monkeypatch.setattr(host_dma, "WINDOW", 1 << 18)
    return every


def _table(count: int = 1500) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3000, count)
    sizes[[3, 5, 9, 11]] = [0, 3 << 18, (1 << 18) + 5, 1 << 18]  # empty, several windows, one window
    aligned = (sizes + 255) // 256 * 256
    offsets = np.cumsum(aligned) - aligned
    tensors = [torch.randint(0, 256, (int(n),), dtype=torch.uint8) for n in sizes]
    return tensors, offsets, sizes, int(aligned.sum()) + 4096


@pytest.mark.parametrize("registered", [False, True], ids=["bounce", "registered"])
def test_writes_and_reads_land_whole_whatever_the_stream_timing(streams: list[_Stream], registered: bool) -> None:
    tensors, offsets, sizes, total = _table()
    ptrs = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    shuffled = np.random.default_rng(1).permutation(len(tensors))
    fd = os.memfd_create("tensord-test")
    os.ftruncate(fd, total)
    mapping = Mapping(fd, total, writable=True)
    reg = pinned.Registration(mapping, mapping.address) if registered else None
    cpu = torch.device("cpu")
    try:
        written, fps = host_dma.write(reg, mapping.address, ptrs[shuffled], offsets[shuffled], sizes[shuffled], cpu)
        for s in streams:
            s.synchronize()
        nonempty = np.flatnonzero(sizes > 0)
        assert np.array_equal(written, offsets[nonempty])
        assert np.array_equal(fps, np.array(fingerprints(tensors), dtype=np.uint64)[nonempty])
        slab = np.frombuffer((ctypes.c_uint8 * total).from_address(mapping.address), dtype=np.uint8)
        assert all(
            bytes(slab[o : o + n]) == t.numpy().tobytes() for t, o, n in zip(tensors, offsets, sizes, strict=True)
        )
        for rows in (shuffled, shuffled[:400]):
            outs = [torch.zeros(int(n), dtype=torch.uint8) for n in sizes]
            at = np.array([t.data_ptr() for t in outs], dtype=np.int64)
            host_dma.read(reg, fd, at[rows], offsets[rows], sizes[rows], cpu)
            for s in streams:
                s.synchronize()
            bad = [int(i) for i in rows if not torch.equal(outs[i], tensors[i])]
            assert not bad, f"{len(bad)} tensors read wrong, e.g. {bad[:3]}"
    finally:
        mapping.close()
        os.close(fd)
