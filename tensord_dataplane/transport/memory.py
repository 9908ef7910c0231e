"""Reference transport: peers are other ``MemoryTransport`` objects of the same process.

Bytes are copied with ``ctypes.memmove`` after checking that every entry lies inside registered
memory on both sides, so the layers above can be tested without a network or hardware. Unlike
Mooncake over TCP it also rejects unregistered *local* ranges, and a batch is all-or-nothing
(every entry is checked before the first byte moves).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import threading
from collections.abc import Sequence

from tensord_contract.errors import TransferError

from .base import Batch, Entry, Registrations, Transport, coalesce

__all__ = ["MemoryTransport", "available"]

logger = logging.getLogger(__name__)

_peers: dict[str, MemoryTransport] = {}  # session -> live transport in this process
_peers_lock = threading.Lock()
_ids = itertools.count(1)


def available() -> tuple[bool, str]:
    """The in-memory transport needs nothing."""
    return True, ""


class MemoryTransport(Transport):
    name = "memory"

    def __init__(self, entry_bytes: int = 0) -> None:
        self.entry_bytes = entry_bytes
        self._session = f"memory:{next(_ids)}"
        self._regs = Registrations(self._session)
        self._lock = threading.Lock()
        self._closed = False
        with _peers_lock:
            _peers[self._session] = self
        logger.info("transport %s ready, session %s", self.name, self._session)

    @property
    def session(self) -> str:
        return self._session

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"transport {self._session} is closed", session=self._session)

    def register(self, address: int, length: int) -> None:
        self._check_open()
        with self._lock:
            self._regs.add(address, length)

    def unregister(self, address: int) -> None:
        self._check_open()
        with self._lock:
            self._regs.remove(address)

    def read(self, session: str, entries: Batch | Sequence[Entry]) -> None:
        self._copy(session, entries, to_local=True)

    def write(self, session: str, entries: Batch | Sequence[Entry]) -> None:
        self._copy(session, entries, to_local=False)

    def _copy(self, session: str, entries: Batch | Sequence[Entry], *, to_local: bool) -> None:
        self._check_open()
        with self._lock:
            batch = coalesce(entries, self._regs)
        with _peers_lock:
            peer = _peers.get(session)
        if peer is None:
            raise TransferError(
                f"peer {session} is not reachable from {self._session}",
                session=self._session,
                peer=session,
                nbytes=batch.nbytes,
            )
        # Lock both sides in a fixed order so two peers copying to each other cannot deadlock.
        locks = sorted({id(self): self._lock, id(peer): peer._lock}.items())
        for _, lock in locks:
            lock.acquire()
        try:
            self._regs.check(batch, side="local", peer=session)
            peer._regs.check(batch, side="remote", peer=self._session)
            for local, remote, n in zip(
                batch.local.tolist(), batch.remote.tolist(), batch.length.tolist(), strict=True
            ):
                if to_local:
                    ctypes.memmove(local, remote, n)
                else:
                    ctypes.memmove(remote, local, n)
        finally:
            for _, lock in reversed(locks):
                lock.release()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _peers_lock:
            _peers.pop(self._session, None)
        with self._lock:
            for seg in self._regs:
                self._regs.remove(seg.address)
        logger.info("transport %s closed, session %s", self.name, self._session)
