"""Waiting for Mooncake's asynchronous transfers: one thread per engine looks at every transfer
in flight, sleeping 20 to 200 us between looks, instead of each caller spinning in
``batch_transfer_sync_*`` (which starves the engine's own threads over TCP; see
``tensord_dataplane.transport.mooncake``)."""

from __future__ import annotations

import threading
import time
from typing import Any

_POLL_FIRST, _POLL_MAX = 20e-6, 200e-6


class Wait:
    """A caller waiting for some asynchronous transfers."""

    def __init__(self, count: int, deadline: float) -> None:
        self.left, self.deadline, self.rc = count, deadline, 0
        self.timed_out = False
        self.done = threading.Event()


class Poller:
    """One thread that waits for every asynchronous transfer of an engine, sleeping 20 to 200 us
    between looks (less when transfers complete), rather than a polling thread per call."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._pending: dict[int, Wait] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, ids: list[int], waiter: Wait) -> None:
        with self._cv:
            for batch_id in ids:
                self._pending[batch_id] = waiter
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mooncake-poller", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        pause = _POLL_FIRST
        while True:
            with self._cv:
                while not self._pending:
                    self._cv.wait()
                    pause = _POLL_FIRST
                ids = list(self._pending)
            finished: list[tuple[int, int]] = []
            for batch_id in ids:
                state = self._engine.transfer_check_status(batch_id)
                if state != 0:  # 1 completed (freed), -1 failed (freed), -2 timed out
                    finished.append((batch_id, state))
            now = time.monotonic()
            with self._cv:
                for batch_id, state in finished:
                    waiter = self._pending.pop(batch_id)
                    if state != 1:
                        waiter.rc = waiter.rc or state
                    waiter.left -= 1
                    if not waiter.left:
                        waiter.done.set()
                for batch_id, waiter in list(self._pending.items()):
                    if now > waiter.deadline:  # given up on (the engine keeps the batch: logged)
                        del self._pending[batch_id]
                        waiter.timed_out = True
                        waiter.rc = waiter.rc or -2
                        waiter.left -= 1
                        if not waiter.left:
                            waiter.done.set()
                busy = bool(self._pending)
            if busy:
                pause = _POLL_FIRST if finished else min(pause * 2, _POLL_MAX)
                time.sleep(pause)
