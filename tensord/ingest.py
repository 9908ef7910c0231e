"""Checkpoint files into the store: read each tensor once, fingerprint it, write it into the slab.

Runs in the client process (the CLI), so the daemon never opens files on a client's behalf.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdk.errors import InvalidArgument
from sdk.tensors import view_bytes
from tensord.checkpoint import read_checkpoint

if TYPE_CHECKING:
    from sdk import Client


class Progress:
    """A one-line progress report on stderr: bytes, GB/s, ETA."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.start = self._last = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done == self.total):
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0.0
            bar = "#" * int(30 * self.done / self.total)
            sys.stderr.write(f"\r[{bar:<30}] {self.done / 1e9:7.2f}/{self.total / 1e9:.2f} GB "
                             f"{rate / 1e9:6.2f} GB/s ETA {eta:5.1f} s")  # fmt: skip
            if self.done == self.total:
                sys.stderr.write("\n")


def load_checkpoint(
    client: Client, path: str | Path, name: str, *, device: str = "cpu", progress: bool = False
) -> tuple[int, int]:
    """Load a .safetensors file or a Hugging Face directory as the next version of `name`.

    Every header is validated before anything is reserved; the version appears only when
    every byte is written. Returns (version, bytes of tensor data).
    """
    tensors = read_checkpoint(path)
    specs = {t.name: (t.dtype, t.shape) for t in tensors}
    total = sum(t.nbytes for t in tensors)
    largest = max((t.nbytes for t in tensors), default=0)
    pin = device != "cpu" and torch.cuda.is_available()
    staging = torch.empty(largest, dtype=torch.uint8, pin_memory=pin)
    bar = Progress(total, progress)
    fds: dict[str, int] = {}
    try:
        with client.reserve(name, specs, device=device) as reservation:
            for t in tensors:
                if t.path not in fds:
                    fds[t.path] = os.open(t.path, os.O_RDONLY)
                buf = staging[: t.nbytes]
                _read_exact(fds[t.path], buf, t.offset, t.path)
                reservation.write(t.name, view_bytes(buf, t.dtype, t.shape))
                bar.advance(t.nbytes)
            return reservation.commit(), total
    finally:
        for fd in fds.values():
            os.close(fd)


def _read_exact(fd: int, buf: torch.Tensor, offset: int, path: str) -> None:
    mv = memoryview(buf.numpy()) if buf.numel() else memoryview(b"")
    done = 0
    while done < len(mv):
        n = os.preadv(fd, [mv[done : done + (1 << 30)]], offset + done)
        if n <= 0:
            raise InvalidArgument(f"{path}: file ended at byte {offset + done} (truncated?)")
        done += n
