"""Replicas in a client's own GPU memory, published without a copy (the R-Fork seed).

A process (an inference engine) publishes tensors that stay where they are: the daemon records
a version whose only bytes on this node are the publisher's CUDA allocations, and hands readers
on this node the publisher's IPC handles (`OwnedReplica`). The replica belongs to the
publishing connection: it is withdrawn when the publisher unpublishes (after the readers'
pins drain) or its connection closes. It uses no daemon budget, is never evicted, recorded in
the state directory or exposed to other nodes.
"""

from __future__ import annotations

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


class OwnedSlab(Slab):
    owned = True

    def __init__(self, replica: OwnedReplica, owner: str) -> None:
        self.device, self.nbytes = f"cuda:{replica.device}", replica.nbytes
        self.generation = secrets.randbits(62)
        self.replica = dataclasses.replace(replica, generation=self.generation)
        self.owner = owner  # who published it (the session's peer)

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        return self.replica.to_wire(), []

    def address(self, *, writable: bool) -> int:
        raise Unavailable(
            f"this replica lies in the memory of the process that published it ({self.owner}): "
            "it is readable on its node only"
        )

    def free(self) -> None:
        """Nothing to free: the publisher owns the memory."""


async def withdraw(store: Store, held: Held) -> None:
    """A publisher's memory leaves: withdraw its replica (and the version, if no other node
    holds it) and retire it, so nobody new pins it. The caller marks it `revoked` if pins
    remain when the memory may change: those readers learn it on release."""
    name, version = held.key
    if held.live:
        try:
            await store.registry.remove_replica(name, version, store.node, held.slab.device)
            if not await store.registry.replicas(name, version):
                await store.registry.delete_version(name, version)
        except (Unavailable, NotFound) as exc:  # the node's lease (or a reconcile) takes it out later
            log.warning("withdrawing %s v%d: %s", name, version, exc.message)
        store.retire(held)


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
