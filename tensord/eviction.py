"""Which versions to evict (`memory.eviction = "lru"`) when a reservation, or a restore from a
file, does not fit its device's budget: unpinned versions on that device, least recently read
first, that can come back. Either another live node holds a replica, or the checkpoint it was
loaded from may be read again (then the version stays in the registry and in the catalogue,
marked evicted, and its next read on this node re-reads it). If evicting every such version
would not make room, nothing is evicted and the request fails with OutOfCapacity. `Store`
carries the plan out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from tensord.checkpoint import recorded_checkpoint
from tensord.records import Held
from tensord.registry.base import Registry
from tensord_contract.errors import TensordError, Unavailable

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
    except TensordError:
        return None
    return "checkpoint"
