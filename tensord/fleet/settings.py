"""The knobs of streaming pulls ([fleet] in configs/tensord.toml), in one object."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

#: auto chunk size: about this many chunks per set, between the two bounds below
AUTO_CHUNKS = 512
AUTO_MIN = 64 << 20
AUTO_MAX = 1 << 30
_MIB = 1 << 20


def auto_chunk(nbytes: int) -> int:
    """The chunk size for a set of `nbytes` when none is configured: ~512 chunks, 64 MiB to
    1 GiB each (a 700 GB set: 1 GiB chunks, 652 of them; a 10 GB one: 64 MiB chunks)."""
    want = -(-nbytes // AUTO_CHUNKS)
    return min(AUTO_MAX, max(AUTO_MIN, -(-want // _MIB) * _MIB))


@dataclass(frozen=True)
class Settings:
    chunk: int = 0  # bytes; 0 = auto_chunk(set size)
    batch: int = 2  # chunks per request
    window: int = 8  # chunks being read or grantable by open requests at once, per pull
    slots: int = 8  # chunks a holder grants and has not seen read yet, per version
    sources: int = 32  # partial holders a pull knows at once
    wait: float = 1.0  # longest a holder holds a request waiting for a chunk or a slot
    stall: float = 5.0  # a redirect that has not delivered by then: ask a complete holder
    advertise: float = 0.5  # how often a pull updates its partial replica in the registry
    rate: int = 0  # bytes/s per pull; 0 = as fast as it goes
    pairs: bool = True  # NCCL (GPU) / gloo (host) groups where the Transfer Engine fails

    def chunk_for(self, nbytes: int) -> int:
        return self.chunk or auto_chunk(nbytes)

    @property
    def refresh(self) -> float:
        """How often a pull reads the registry again for new holders."""
        return max(4 * self.advertise, 0.5)

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        # Pushes over a pair group cost a round trip and a synchronize each: with NCCL alone,
        # bigger batches (8 GiB onto the other H200: fetch 77 ms at 2/8/8, 40 ms at 8/32/32).
        pushed = config.transport_protocol == "nccl"
        return cls(
            chunk=config.fleet_chunk,
            batch=config.fleet_batch or (8 if pushed else 2),
            window=config.fleet_window or (32 if pushed else 8),
            slots=config.fleet_slots or (32 if pushed else 8),
            sources=config.fleet_sources,
            wait=config.fleet_wait,
            stall=config.fleet_stall,
            advertise=config.fleet_advertise,
            rate=config.fleet_rate,
            pairs=config.fleet_pairs,
        )


class Pace:
    """Holds a pull to `rate` bytes per second (0: as fast as it goes)."""

    def __init__(self, rate: int) -> None:
        self.rate, self.start, self.bytes = rate, 0.0, 0

    async def wait(self, nbytes: int) -> None:
        """Account `nbytes` about to be read; sleep until reading them keeps to the rate."""
        if not self.rate or not nbytes:
            return
        now = time.monotonic()
        if not self.start:
            self.start = now
        self.bytes += nbytes
        ahead = self.start + self.bytes / self.rate - now
        if ahead > 0:
            await asyncio.sleep(ahead)
