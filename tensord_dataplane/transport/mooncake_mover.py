"""Over nvlink_intra, the engine that moves bytes is not the one that serves.

With Mooncake's metadata cache off, every nvlink_intra entry fetched the peer's whole
description of its registered memory: 38.7 ms an entry from a publisher of 9,005 allocations
on an H100, against 8.7 us with the cache on. With the cache on, an engine keeps the first
description it fetched of a peer and refuses ranges the peer registered since. So a transport
moves bytes with an engine of its own, cache on (the local side of an nvlink_intra copy need
not be registered with it), and replaces that engine when a transfer fails: the new one
fetches fresh descriptions. The serving engine (registrations, the advertised session) moves
no bytes, so its cache does not matter.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)


class Mover:
    """The moving engine, made on first use by `make`; `renew` replaces it once no transfer
    uses it (Mooncake's destructor unmaps what the old one mapped before the new one maps it
    again: a CUDA IPC handle may be open once per process)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._engine: Any = None
        self._generation = 0
        self._users = 0
        self._renewing = False
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def use(self) -> Iterator[tuple[Any, int]]:
        """The engine, and its generation (for `renew`)."""
        with self._cond:
            while self._renewing:
                self._cond.wait()
            if self._engine is None:
                self._engine = self._make()
            self._users += 1
            engine, generation = self._engine, self._generation
        try:
            yield engine, generation
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def renew(self, generation: int) -> None:
        """Drop the engine of `generation` (a transfer through it failed; a peer may have
        registered memory since it fetched the peer's description); the next `use` makes a
        new one. Nothing if it was renewed meanwhile."""
        with self._cond:
            while self._renewing:
                self._cond.wait()
            if generation != self._generation or self._engine is None:
                return
            self._renewing = True
            while self._users:
                self._cond.wait()
            old, self._engine = self._engine, None
            self._generation += 1
        try:
            del old  # the native destructor closes its IPC mappings and listeners (about 1 s)
        finally:
            with self._cond:
                self._renewing = False
                self._cond.notify_all()
        logger.info("renewed the engine that moves bytes (generation %d)", generation + 1)

    def close(self) -> None:
        """Drop the engine once no transfer uses it."""
        with self._cond:
            while self._users or self._renewing:
                self._cond.wait()
            old, self._engine = self._engine, None
        del old
