"""CUDA IPC mappings of daemon slabs, kept open a few seconds for the next read.

Opening a handle maps the daemon's whole allocation into this process and closing it unmaps it
again: about a millisecond each, which a read of a large set on the same GPU notices. The
daemon reuses its GPU allocations for later slabs instead of freeing them (`tensord.memory.
CudaBlocks`), so a process keeps each mapping for `TENSORD_IPC_KEEP_SECONDS` (default 10, 0 =
close after every read) after its last use and reads again without opening it. What a read
sees is decided by its pin, as always: a mapping only makes the daemon's memory addressable.
An idle mapping is closed by a timer. While a process keeps a mapping, the daemon cannot give
that allocation back to the driver (torch parks it until every importer closes), which it does
only when GPU memory runs out for a new slab; that slab then fails with OutOfCapacity until the
mapping closes.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tensord_contract.errors import InvalidArgument

DEFAULT_KEEP_SECONDS = 10.0


def keep_seconds() -> float:
    text = os.environ.get("TENSORD_IPC_KEEP_SECONDS")
    if text is None:
        return DEFAULT_KEEP_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise InvalidArgument(f"TENSORD_IPC_KEEP_SECONDS={text!r}: expected seconds from 0 to 3600")
    return value


class Mappings:
    """This process's kept mappings of daemon allocations."""

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], tuple[Any, float]] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def open(self, ipc: list[Any], *, keep: bool = True) -> torch.UntypedStorage:
        """The daemon's storage that `ipc` (from ``_share_cuda_``) describes, mapped here.

        Writers pass `keep=False`: a reservation's block is often not written again soon, and
        while mapped here the daemon could not give it back to the driver under pressure."""
        key = tuple(ipc[:4])  # device, allocation handle, storage size and offset
        return self.open_many([key], lambda _: torch.UntypedStorage._new_shared_cuda(*ipc), keep=keep)[0]

    def open_many(
        self, keys: list[tuple[Any, ...]], opener: Callable[[tuple[Any, ...]], Any], *, keep: bool = True
    ) -> list[Any]:
        """What `opener(key)` maps for each key (a storage or tensor that unmaps when dropped),
        kept under that key; one lock for all (a publisher has thousands of allocations)."""
        seconds = keep_seconds() if keep else 0.0
        now = time.monotonic()
        out: list[Any] = [None] * len(keys)
        missing = []
        with self._lock:
            kept = self._kept
            for i, key in enumerate(keys):
                hit = kept.get(key)
                if hit is None:
                    missing.append(i)
                else:
                    kept[key] = (hit[0], now)
                    out[i] = hit[0]
        if missing:
            torch.cuda.init()  # opening a handle in a process that never touched CUDA crashes
        for i in missing:
            out[i] = opener(keys[i])
        if seconds > 0 and missing:
            with self._lock:
                now = time.monotonic()
                for i in missing:
                    self._kept[keys[i]] = (out[i], now)
                self._arm(seconds)
        return out

    def _arm(self, delay: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(delay, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def _expire(self) -> None:
        seconds = keep_seconds()
        with self._lock:
            self._timer = None
            now = time.monotonic()
            idle = [self._kept.pop(k)[0] for k, (_, used) in list(self._kept.items()) if now - used >= seconds]
            if self._kept:
                oldest = min(used for _, used in self._kept.values())
                self._arm(max(0.1, seconds - (now - oldest)))
        del idle  # unmapped here, outside the lock, unless a mount's views still use them

    def clear(self) -> None:
        """Close every kept mapping now (also at exit, while CUDA is still up)."""
        with self._lock:
            kept = list(self._kept.values())
            self._kept.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        del kept

    def kept(self) -> int:
        return len(self._kept)


mappings = Mappings()
atexit.register(mappings.clear)
