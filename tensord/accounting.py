"""Memory per device as an operator needs it to see one copy, not two (`status`, metrics):

budget     what the daemon may hold there
used       bytes the daemon holds or has reserved (its slabs: counted against the budget)
idle       freed GPU memory the daemon keeps for its next slabs
held       bytes of committed versions in the daemon's slabs
published  bytes of versions that lie in publishing processes' own memory (no copy here)
mapped     bytes of the daemon's versions that clients map zero-copy (mounts): no copy either
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tensord.records import Held


def devices(live: Iterable[Held], budgets: Any, idle: Callable[[str], int]) -> dict[str, dict[str, int]]:
    """Per device (every budgeted one, and any a publication lies on): the figures above."""
    out = {
        d: {
            "budget": budgets.limit[d],
            "used": budgets.used[d],
            "idle": idle(d),
            "held": 0,
            "published": 0,
            "mapped": 0,
        }
        for d in budgets.limit
    }
    for h in live:
        row = out.setdefault(h.slab.device, {"budget": 0, "used": 0, "idle": 0, "held": 0, "published": 0, "mapped": 0})
        if h.slab.published:
            row["published"] += h.manifest.data_bytes
            continue
        row["held"] += h.slab.nbytes
        if h.mapped > 0:
            row["mapped"] += h.manifest.data_bytes
    return out
