"""Replicas in a client's own GPU memory, published without a copy (the R-Fork seed).

A process (an inference engine) publishes tensors that stay where they are: the daemon records
a version whose only bytes on this node are the publisher's CUDA allocations, and hands readers
on this node the publisher's IPC handles (`OwnedReplica`). The replica belongs to the
publishing connection: it is withdrawn when the publisher unpublishes (after the readers'
pins drain) or its connection closes. It uses no daemon budget, is never evicted, restored
after a restart or exposed to other nodes; the state directory records it only so that a
daemon restarted after a crash withdraws it from the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tensord.held import Held
from tensord.memory import Slab
from tensord_contract.descriptors import OwnedReplica
from tensord_contract.errors import NotFound, Unavailable

if TYPE_CHECKING:
    from tensord.store import Store

log = logging.getLogger(__name__)

#: the source a publication is recorded with in the state directory: withdrawn, never restored
PUBLISHED = "published"
_RETRY = (0.5, 30.0)  # seconds between tries while the registry is unreachable
_retries: set[asyncio.Task[None]] = set()


class OwnedSlab(Slab):
    owned = True

    def __init__(self, replica: OwnedReplica, owner: str) -> None:
        self.device, self.nbytes = f"cuda:{replica.device}", replica.nbytes
        self.generation = secrets.randbits(62)
        self.replica = dataclasses.replace(replica, generation=self.generation)
        self.owner = owner  # who published it (the session's peer)
        self._wire = self.replica.to_wire()  # sent with every open: built once

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        return self._wire, []

    def address(self, *, writable: bool) -> int:
        raise Unavailable(
            f"this replica lies in the memory of the process that published it ({self.owner}): "
            "it is readable on its node only"
        )

    def free(self) -> None:
        """Nothing to free: the publisher owns the memory."""


async def withdraw(store: Store, held: Held) -> None:
    """A publisher's memory leaves: retire it here (nobody new pins it), then take it out of
    the registry. The caller marks it `revoked` if pins remain when the memory may change:
    those readers learn it on release."""
    if held.live:
        store.retire(held)
        await withdraw_version(store, *held.key, held.slab.device)


async def withdraw_version(store: Store, name: str, version: int, device: str) -> None:
    """Remove this node's replica of a publication from the registry, and the version when no
    other node holds one (so "latest" falls back), then forget its record. While the registry
    is unreachable this is retried in the background; a daemon restarted after a crash does it
    for the publications its state directory recorded (`tensord.restore`)."""
    try:
        await _withdraw_once(store, name, version, device)
    except Unavailable as exc:
        log.warning("withdrawing %s v%d waits for the registry: %s", name, version, exc.message)
        task = asyncio.get_running_loop().create_task(_retry(store, name, version, device))
        _retries.add(task)
        task.add_done_callback(_retries.discard)


async def _withdraw_once(store: Store, name: str, version: int, device: str) -> None:
    registry = store.registry
    with contextlib.suppress(NotFound):  # deleted meanwhile: nothing left to withdraw
        await registry.remove_replica(name, version, store.node, device)
        if not await registry.replicas(name, version):
            await registry.delete_version(name, version)
    await store.forget(name, version)


async def _retry(store: Store, name: str, version: int, device: str) -> None:
    pause = _RETRY[0]
    while True:
        await asyncio.sleep(pause)
        try:
            await _withdraw_once(store, name, version, device)
            log.info("withdrew %s v%d from the registry", name, version)
            return
        except Unavailable:
            pause = min(pause * 2, _RETRY[1])


def published(held: Iterable[Held]) -> list[dict[str, Any]]:
    """The owned replicas among `held`, for `status`."""
    return [
        {
            "name": h.key[0],
            "version": h.key[1],
            "device": h.slab.device,
            "bytes": h.manifest.nbytes,
            "pins": h.pins,
            "owner": h.slab.owner,
        }
        for h in held
        if isinstance(h.slab, OwnedSlab)
    ]
