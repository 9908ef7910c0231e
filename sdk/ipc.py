"""CUDA IPC mappings of daemon slabs: opened for each read, closed in the background.

Opening a handle maps the daemon's whole allocation into this process and closing it unmaps it
again, each about a millisecond for a large allocation. A read waits for the open but not for
the close: once its copies are done, the last reference to the mapping is dropped on a
background thread, right away, so no memory the daemon frees stays mapped here.

`TENSORD_IPC_KEEP_SECONDS` (default 0) also keeps a read's mapping for that long after its last
use, so that reading the same slab again skips the open. While kept, a slab the daemon has
freed cannot be reused by it (torch parks it until every importer closes), so a put right
after a delete can fail for memory: keep it 0 unless the GPU has room for that.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
from typing import Any

import torch

from sdk.errors import InvalidArgument


def keep_seconds() -> float:
    text = os.environ.get("TENSORD_IPC_KEEP_SECONDS", "0")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise InvalidArgument(f"TENSORD_IPC_KEEP_SECONDS={text!r}: expected seconds from 0 to 3600")
    return value


class Mappings:
    """This process's open mappings of daemon slabs, and the thread that closes them."""

    def __init__(self) -> None:
        self._kept: dict[tuple[Any, ...], tuple[torch.UntypedStorage, float]] = {}
        self._lock = threading.Lock()
        self._closing: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closer: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    def open(self, ipc: list[Any], *, keep: bool = True) -> torch.UntypedStorage:
        """The daemon's storage that `ipc` (from ``_share_cuda_``) describes, mapped here."""
        seconds = keep_seconds() if keep else 0.0
        key = tuple(ipc[:4])  # device, allocation handle, storage size and offset
        with self._lock:
            hit = self._kept.get(key)
            if hit is not None:
                self._kept[key] = (hit[0], time.monotonic())
                return hit[0]
        torch.cuda.init()  # opening a handle in a process that never touched CUDA crashes
        storage = torch.UntypedStorage._new_shared_cuda(*ipc)
        if seconds > 0:
            with self._lock:
                self._kept[key] = (storage, time.monotonic())
                self._arm(seconds)
        return storage

    def close_later(self, mapping: object) -> None:
        """Drop `mapping` (a tensor or storage: its last reference) on the closing thread."""
        with self._lock:
            if self._closer is None:
                self._closer = threading.Thread(target=self._close_forever, name="tensord-ipc-close", daemon=True)
                self._closer.start()
        self._closing.put(mapping)

    def _close_forever(self) -> None:
        while True:
            item = self._closing.get()
            del item

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
            for key in [k for k, (_, used) in self._kept.items() if now - used >= seconds]:
                self._closing.put(self._kept.pop(key)[0])
            if self._kept:
                oldest = min(used for _, used in self._kept.values())
                self._arm(max(0.1, seconds - (now - oldest)))

    def clear(self) -> None:
        """Close every mapping now (also at exit, while CUDA is still up)."""
        with self._lock:
            kept = list(self._kept.values())
            self._kept.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        del kept
        while True:
            try:
                item = self._closing.get_nowait()
            except queue.Empty:
                return
            del item

    def kept(self) -> int:
        return len(self._kept)


mappings = Mappings()
atexit.register(mappings.clear)
