"""CUDA IPC mappings of daemon slabs, kept open for a few seconds after their last use.

Opening a handle maps the daemon's whole allocation into this process and closing it unmaps
it again: about a millisecond each, as much as copying a gigabyte on the same GPU. A process
that reads the same slab again within `TENSORD_IPC_KEEP_SECONDS` (default 10, 0 = never keep)
reuses the mapping. What is read is still decided by the pin of each read: the mapping only
makes the daemon's memory addressable. An idle mapping is closed by a timer, so a process
holds the memory of a slab the daemon freed for at most that long.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

import torch

from sdk.errors import InvalidArgument

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


class IpcCache:
    def __init__(self) -> None:
        self._open: dict[tuple[Any, ...], tuple[torch.UntypedStorage, float]] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def storage(self, ipc: list[Any]) -> torch.UntypedStorage:
        """The daemon's storage that `ipc` (from ``_share_cuda_``) describes, mapped here."""
        keep = keep_seconds()
        key = tuple(ipc[:4])  # device, allocation handle, storage size and offset
        with self._lock:
            hit = self._open.get(key)
            if hit is not None:
                self._open[key] = (hit[0], time.monotonic())
                return hit[0]
        torch.cuda.init()  # opening a handle in a process that never touched CUDA crashes
        storage = torch.UntypedStorage._new_shared_cuda(*ipc)
        if keep > 0:
            with self._lock:
                self._open[key] = (storage, time.monotonic())
                self._arm(keep)
        return storage

    def _arm(self, delay: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(delay, self._sweep)
            self._timer.daemon = True
            self._timer.start()

    def _sweep(self) -> None:
        keep = keep_seconds()
        with self._lock:
            self._timer = None
            now = time.monotonic()
            idle = [k for k, (_, used) in self._open.items() if now - used >= keep]
            dropped = [self._open.pop(k) for k in idle]
            if self._open:
                self._arm(max(0.1, keep - (now - min(used for _, used in self._open.values()))))
        del dropped  # closed here, outside the lock, when no view holds them any more

    def clear(self) -> None:
        with self._lock:
            dropped = list(self._open.values())
            self._open.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        del dropped


cache = IpcCache()
atexit.register(cache.clear)  # close while CUDA is still up
