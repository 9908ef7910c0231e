"""What a pull has done so far, as `status` and the log show it: bytes in, per source, and the
seconds spent in each phase (setting up, fetching, checking, promoting)."""

from __future__ import annotations

import time
from typing import Any


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.phases: dict[str, float] = {}  # seconds spent setting up, fetching, checking, promoting
        self._mark = self.started
        self.bytes = 0
        self.sourced: dict[str, int] = {}  # bytes per source

    def arrived(self, node: str, nbytes: int) -> None:
        self.bytes += nbytes
        self.sourced[node] = self.sourced.get(node, 0) + nbytes

    def phase(self, name: str) -> None:
        """The phase `name` ended now."""
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    def status(self, name: str, version: int, chunks: int, chunk: int, held: int) -> dict[str, Any]:
        return {"name": name, "version": version, "chunks": chunks, "chunk": chunk, "held": held,
                "bytes": self.bytes, "seconds": time.monotonic() - self.started, "sources": dict(self.sourced),
                "phases": {k: round(v, 4) for k, v in self.phases.items()}}  # fmt: skip
