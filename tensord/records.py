"""What the store keeps per version: a version held on this node (`Held`), and a reservation
being written (`Reservation`), each with its slab."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tensord.memory import Slab
from tensord_contract.manifest import Manifest


@dataclass(eq=False)
class Held:
    """One version held on this node."""

    manifest: Manifest
    slab: Slab
    pins: int = 0
    live: bool = True  # False once retired, deleted or evicted: no new pins; freed when pins reach 0
    freed: bool = False  # its slab was freed and its budget given back (once only)
    advertised: bool = False  # True once the registry knows it (reconcile trusts no other)
    revoked: bool = False  # a publisher's memory withdrawn while pinned: those readers' bytes may change
    mapped: int = 0  # of the pins, those of clients' mounts (zero-copy mappings, no copy)
    drained: asyncio.Event | None = None  # set when the last pin goes (an unpublish waits on it)
    last_read: float = field(default_factory=time.monotonic)  # when last pinned (or created): LRU

    @property
    def key(self) -> tuple[str, int]:
        return self.manifest.name, self.manifest.version


@dataclass(eq=False)
class Reservation:
    id: int
    name: str
    manifest: Manifest  # version 0 until commit
    slab: Slab
    origin: str
    started: float = field(default_factory=time.time)
