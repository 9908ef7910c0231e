"""Withdrawing a publication from the registry: at `unpublish`, at the publisher's end, and for
the publications a restarted daemon's state directory recorded (their publishers went with it).
A withdrawal that meets an unreachable registry retries in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from tensord.records import Held
from tensord_contract.errors import NotFound, Unavailable

if TYPE_CHECKING:
    from tensord.context import NodeContext
    from tensord.store import Store

log = logging.getLogger(__name__)
_RETRY = (0.5, 30.0)  # seconds between tries while the registry is unreachable
_retries: set[asyncio.Task[None]] = set()


async def withdraw(store: Store, context: NodeContext, held: Held) -> None:
    """A publisher's memory leaves: retire it here (nobody new pins it), then take it out of
    the registry. The caller marks it `revoked` if pins remain when the memory may change:
    those readers learn it on release."""
    if held.live:
        store.retire(held)
        await withdraw_version(store, context, *held.key, held.slab.device)


async def withdraw_version(store: Store, context: NodeContext, name: str, version: int, device: str) -> None:
    """Remove this node's replica of a publication from the registry, and the version when no
    other node holds one (so "latest" falls back), then forget its record. While the registry
    is unreachable this is retried in the background; a daemon restarted after a crash does it
    for the publications its state directory recorded (`tensord.restore`)."""
    try:
        await _withdraw_once(store, context, name, version, device)
    except Unavailable as exc:
        log.warning("withdrawing %s v%d waits for the registry: %s", name, version, exc.message)
        task = asyncio.get_running_loop().create_task(_retry(store, context, name, version, device))
        _retries.add(task)
        task.add_done_callback(_retries.discard)


async def _withdraw_once(store: Store, context: NodeContext, name: str, version: int, device: str) -> None:
    registry = context.registry
    with contextlib.suppress(NotFound):  # deleted meanwhile: nothing left to withdraw
        await registry.remove_replica(name, version, context.node, device)
        if not await registry.replicas(name, version):
            await registry.delete_version(name, version)
    await store.forget(name, version)


async def _retry(store: Store, context: NodeContext, name: str, version: int, device: str) -> None:
    pause = _RETRY[0]
    while True:
        await asyncio.sleep(pause)
        try:
            await _withdraw_once(store, context, name, version, device)
            log.info("withdrew %s v%d from the registry", name, version)
            return
        except Unavailable:
            pause = min(pause * 2, _RETRY[1])
