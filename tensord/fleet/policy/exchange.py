"""What the puller and the holder share: where a puller starts in the chunk order, what it
knows about one source, and one request (see `tensord.fleet.policy`)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np


def start_of(index: int, of: int, chunks: int) -> int:
    """Where the `index`-th of `of` simultaneous pullers starts in a set of `chunks` chunks."""
    return (index * chunks) // max(of, 1) % max(chunks, 1)


def start_for(node: str, chunks: int) -> int:
    """Where a lone puller starts: a hash of its node id."""
    return zlib.crc32(node.encode()) % max(chunks, 1)


def rotation(start: int, count: int) -> np.ndarray:
    """Chunk indices in the order of a puller that starts at `start`."""
    return np.roll(np.arange(count, dtype=np.int64), -(start % max(count, 1)))


@dataclass(eq=False)
class Source:
    """What a puller knows about one holder of the version it pulls."""

    node: str
    complete: bool
    have: np.ndarray  # bool per chunk; all True for a complete holder
    same_host: bool = False
    busy: int = 0  # reads in flight on it, as it last said
    asking: bool = False  # a request of this plan is outstanding there
    pending: int = 0  # the limit of this plan's open request outstanding there (window room it holds)
    subscribed: bool = False  # that request went to a holder not known to have anything wanted
    reading: int = 0  # chunks granted by it that this plan is reading
    backoff: bool = False  # it said it was full: ask again once a read from it is done
    used: float = 0.0  # when it last granted this plan something
    dead: bool = False
    spread: int = 0  # fixed tiebreak between equal holders


@dataclass(frozen=True)
class Request:
    """One request to `node`: named `chunks` (`force`: those a complete holder must grant
    rather than redirect), or an open request (`want` set: any of those, at most `limit`).
    `done`: chunks read from it since the last request, `declined`: chunks it granted that
    were not read (they came from elsewhere first); either way their upload slots are free."""

    node: str
    chunks: list[int] = field(default_factory=list)
    force: list[int] = field(default_factory=list)
    want: np.ndarray | None = None
    limit: int = 0
    done: list[int] = field(default_factory=list)
    declined: list[int] = field(default_factory=list)  # granted, not read (it came elsewhere)

    @property
    def open(self) -> bool:
        return self.want is not None

    @property
    def asks(self) -> bool:
        return bool(self.chunks) or self.open
