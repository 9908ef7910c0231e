"""The version table: the versions this node holds (`Held`), those evicted here that come back
from their checkpoint, those whose eviction is still being withdrawn, their pins, and their
records in the state directory's catalogue.

One lifecycle per version: held (pinnable while live) → retired, deleted or evicted (no new
pins) → freed once, when its last pin goes. The table frees a slab through the `free` it is
handed (the store's: budget, Transfer Engine registration); it never allocates. `Store` adds
versions to it; its eviction (`tensord.eviction.Eviction`), retention and reservations work
through its methods."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tensord.memory import Slab
from tensord.records import Held
from tensord.state import Catalogue
from tensord_contract.manifest import Manifest

Key = tuple[str, int]


class Versions:
    def __init__(self, free: Callable[[Slab], None], catalogue: Catalogue | None, *, keep_manifests: bool) -> None:
        """`catalogue`: where held versions are recorded (the state directory's), with their
        manifests when `keep_manifests` (the embedded registry's state)."""
        self._free, self._catalogue, self.keep_manifests = free, catalogue, keep_manifests
        self._held: dict[Key, Held] = {}
        #: versions evicted here that come back from their checkpoint on their next read
        self._evicted: dict[Key, tuple[Manifest, str]] = {}
        #: versions evicted whose replica and record are still being withdrawn (adopt waits)
        self._leaving: dict[Key, asyncio.Event] = {}

    # -- looking up ---------------------------------------------------------------------------
    def holds(self, name: str, version: int) -> Held | None:
        """The live version held here, or None."""
        held = self._held.get((name, version))
        return held if held is not None and held.live else None

    def lookup(self, name: str, version: int) -> Held | None:
        """The version held here, live or retired while still pinned, or None."""
        return self._held.get((name, version))

    def all(self) -> list[Held]:
        """Every version in the table, live or retired while pinned."""
        return list(self._held.values())

    def live(self, name: str | None = None) -> list[Held]:
        """The live versions (of `name`)."""
        return [h for h in self._held.values() if h.live and (name is None or h.manifest.name == name)]

    @property
    def pins(self) -> int:
        return sum(h.pins for h in self._held.values())

    def evicted(self, name: str, version: int) -> tuple[Manifest, str] | None:
        """The manifest and device of a version evicted here that comes back from its checkpoint."""
        return self._evicted.get((name, version))

    @property
    def evicted_count(self) -> int:
        return len(self._evicted)

    def note_evicted(self, manifest: Manifest, device: str) -> None:
        """A version evicted (before a restart, or whose return failed): it comes back on its
        next read."""
        self._evicted[manifest.name, manifest.version] = (manifest, device)

    # -- holding ------------------------------------------------------------------------------
    def add(self, held: Held) -> tuple[Manifest, str] | None:
        """Hold `held` (before the registry knows it, so whoever resolves it finds it); it is no
        longer evicted: what its eviction record was."""
        self._held[held.key] = held
        return self._evicted.pop(held.key, None)

    def unlist(self, held: Held) -> None:
        """Take `held` out of the table without freeing its slab (a commit that failed)."""
        if self._held.get(held.key) is held:
            del self._held[held.key]

    async def settled(self, key: Key) -> Held | None:
        """Wait until an eviction of `key` under way is withdrawn; the live version then held."""
        while (leaving := self._leaving.get(key)) is not None:
            await leaving.wait()
        return self.holds(*key)

    async def record(self, manifest: Manifest, device: str, source: str, *, evicted: bool = False) -> None:
        """Note in the state directory that this node holds (or evicted) a version."""
        if self._catalogue is not None:
            await self._catalogue.note(manifest, device, source, evicted=evicted, with_manifest=self.keep_manifests)

    async def forget(self, name: str, version: int) -> None:
        """A version left this node for good: nothing to restore or recover. Unavailable if
        its record cannot be removed from the state directory (it stays recorded)."""
        self._evicted.pop((name, version), None)
        if self._catalogue is not None:
            await self._catalogue.forget(name, version)

    # -- pins ---------------------------------------------------------------------------------
    def pin(self, held: Held, count: int = 1) -> None:
        held.pins += count
        held.last_read = time.monotonic()

    def unpin(self, held: Held) -> None:
        held.pins -= 1
        if held.pins == 0 and held.drained is not None:
            held.drained.set()
        if held.pins == 0 and not held.live:
            self.drop(held)

    # -- leaving ------------------------------------------------------------------------------
    def retire(self, held: Held) -> None:
        """No new pins; freed when the last pin goes."""
        if not held.live:  # retired, evicted or freed already: once only
            return
        held.live = False
        if held.pins == 0:
            self.drop(held)

    def drop(self, held: Held) -> None:
        """Forget and free a version's slab, once: a second free would give its budget back
        twice, or close a descriptor number reused since."""
        held.live = False
        self.unlist(held)
        if not held.freed:
            held.freed = True
            self._free(held.slab)

    def claim(self, held: Held, reason: str) -> float:
        """Evict now: unresolvable, unpinnable, slab freed, marked evicted where it comes back
        from its checkpoint, leaving until `withdrawn`; seconds since it was last read."""
        self._leaving[held.key] = asyncio.Event()
        self.drop(held)
        if reason == "checkpoint":
            self._evicted[held.key] = (held.manifest, held.slab.device)
        return time.monotonic() - held.last_read

    def still_evicted(self, held: Held) -> bool:
        """Whether `held`, claimed for its checkpoint, is still marked evicted (not deleted meanwhile)."""
        return self._evicted.get(held.key, (None,))[0] is held.manifest

    def withdrawn(self, held: Held) -> None:
        """An eviction's withdrawal ended: whoever waits to hold the version again goes on."""
        self._leaving.pop(held.key).set()
