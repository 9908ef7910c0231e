"""What a session holds for its peer until released (`Session.pins`), behind one interface
(`Pin`): the release path gives any of them back without asking which kind it is.

    ReadPin, MountPin   a version held here, pinned for a read or a mount (here)
    RemotePin           a pin on another node taken by this gateway (`tensord.peers`)
    StreamPin           a puller's hold on a replica it streams from (`tensord.fleet.serve`)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tensord.records import Held


class Pin(Protocol):
    async def release(self, *, clean: bool) -> bool:
        """Give it back (`clean`: the peer released it; else its session ended); whether what it
        pinned stayed intact meanwhile (a publication withdrawn under a pin did not)."""
        ...


@dataclass(eq=False)
class ReadPin:
    """A version held here, pinned for a reader; `unpin` (the store's) gives it back."""

    held: Held
    unpin: Callable[[Held], None]

    async def release(self, *, clean: bool) -> bool:
        self.unpin(self.held)
        return not self.held.revoked  # a publisher's memory withdrawn while pinned


@dataclass(eq=False)
class MountPin(ReadPin):
    """A pin taken for a mount: the client maps the version's memory (`Held.mapped`)."""

    def __post_init__(self) -> None:
        self.held.mapped += 1

    async def release(self, *, clean: bool) -> bool:
        self.held.mapped -= 1
        return await super().release(clean=clean)
