"""Which versions to evict (`memory.eviction = "lru"`) when a reservation, or a restore from a
file, does not fit its device's budget: unpinned versions on that device, least recently read
first, that can come back. Either another live node holds a replica, or the checkpoint it was
loaded from may be read again (then the version stays in the registry and in the catalogue,
marked evicted, and its next read on this node re-reads it). If evicting every such version
would not make room, nothing is evicted and the request fails with OutOfCapacity. `Eviction`
carries the plan out on the version table (`tensord.versions.Versions`) it is handed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from tensord.checkpoint import recorded_checkpoint, recorded_rank
from tensord.memory import Budgets
from tensord.metrics import Metrics
from tensord.records import Held
from tensord.registry.base import Registry
from tensord.versions import Versions
from tensord_contract.errors import TensordError, Unavailable
from tensord_contract.manifest import ALIGN

log = logging.getLogger(__name__)
Reason = Callable[[Held], Awaitable[str | None]]


def evictable(held: Held, device: str) -> bool:
    """Live, advertised (not being held or brought back), unpinned, on `device`, the store's own."""
    return held.live and held.advertised and held.pins == 0 and held.slab.device == device and not held.slab.published


async def plan_room(
    held: Callable[[], list[Held]], device: str, need: Callable[[], int], reason: Reason
) -> list[tuple[Held, str]]:
    """What to evict from `device` (with why) so that `need()` more bytes fit: evictable
    versions, least recently read first, all still evictable when returned (the caller evicts
    them before it awaits anything); none if that would not make room."""
    for _ in range(3):  # one planned may be pinned while `reason` is asked: plan again
        if need() <= 0:
            return []
        plan, freed = await choose([h for h in held() if evictable(h, device)], need(), reason)
        if freed < need():
            log.info("%s: evicting all that could go frees %d bytes of the %d needed", device, freed, need())
            return []
        plan = [(h, why) for h, why in plan if evictable(h, device)]
        if sum(h.slab.nbytes for h, _ in plan) >= need():
            return plan
    return []


async def choose(candidates: Sequence[Held], need: int, reason: Reason) -> tuple[list[tuple[Held, str]], int]:
    """The least recently read `candidates` that may go (`reason` says why, None if they may
    not) until `need` bytes are freed, with their reasons; and the bytes they free."""
    plan: list[tuple[Held, str]] = []
    freed = 0
    for held in sorted(candidates, key=lambda h: h.last_read):
        why = await reason(held)
        if why is not None:
            plan.append((held, why))
            freed += held.slab.nbytes
            if freed >= need:
                break
    return plan, freed


async def recoverable(held: Held, registry: Registry, node: str, allowed_roots: Sequence[str]) -> str | None:
    """Why `held` may be evicted from `node`: "replica" (another live node holds it),
    "checkpoint" (its file may be read again); None if it may not."""
    name, version = held.key
    try:
        others = {r.node for r in await registry.replicas(name, version) if r.node != node}
        if others and others & {n.node for n in await registry.nodes()}:
            return "replica"
    except Unavailable:
        pass  # no word on other replicas: only the checkpoint counts
    try:
        recorded_checkpoint(held.manifest.origin, allowed_roots)
        recorded_rank(held.manifest.origin)
    except TensordError:
        return None
    return "checkpoint"


class Eviction:
    """Makes room on a device by evicting from the version table (`policy` "lru"; "none"
    evicts nothing). Claims what it frees before it awaits anything."""

    def __init__(
        self,
        versions: Versions,
        budgets: Budgets,
        registry: Registry,
        metrics: Metrics,
        node: str,
        *,
        policy: str,
        allowed_roots: Sequence[str],
    ) -> None:
        self._versions, self._budgets, self._registry, self._metrics = versions, budgets, registry, metrics
        self.node, self.policy, self.allowed_roots = node, policy, tuple(allowed_roots)

    async def make_room(self, device: str, nbytes: int) -> None:
        """With eviction on, evict unpinned versions on `device` that can come back, least recently
        read first, until `nbytes` more fit. Evicts nothing if that would not make room."""
        device, nbytes, budgets = self._budgets.check_device(device), max(nbytes, ALIGN), self._budgets
        if self.policy != "lru":
            return
        plan = await plan_room(
            self._versions.all,
            device,
            lambda: budgets.used[device] + nbytes - budgets.limit[device],
            lambda h: recoverable(h, self._registry, self.node, self.allowed_roots),
        )
        claimed = [(h, why, self._versions.claim(h, why)) for h, why in plan]  # at once: none pinned meanwhile
        try:
            for held, reason, idle in claimed:
                await self._withdraw(held, reason, idle)
        finally:
            for held, _, _ in claimed:
                self._versions.withdrawn(held)

    async def _withdraw(self, held: Held, reason: str, idle: float) -> None:
        """An eviction's second half: withdraw the replica, note it in the state directory."""
        (name, version), device, nbytes = held.key, held.slab.device, held.slab.nbytes
        try:
            await self._registry.remove_replica(name, version, self.node, device)
        except TensordError as exc:  # readers elsewhere find the pin refused and try another
            log.warning("evicting %s v%d: cannot withdraw its replica now: %s", name, version, exc.message)
        try:
            if reason != "checkpoint":
                await self._versions.forget(name, version)
            elif self._versions.still_evicted(held):  # not deleted meanwhile
                await self._versions.record(held.manifest, device, held.manifest.origin, evicted=True)
        except TensordError as exc:  # it stays recorded as held: a restart reads it again
            log.warning("%s", exc.message)
        self._metrics.evictions.labels(device, reason).inc()
        self._metrics.evicted_bytes.labels(device).inc(nbytes)
        why = "another node holds it" if reason == "replica" else f"comes back from {held.manifest.origin}"
        log.info("evicted %s v%d (%d bytes on %s, last read %.0f s ago): %s", name, version, nbytes, device, idle, why)
