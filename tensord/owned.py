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

import dataclasses
import secrets
from collections.abc import Iterable
from typing import Any

from tensord.held import Held
from tensord.memory import Slab
from tensord_contract.descriptors import OwnedReplica
from tensord_contract.errors import Unavailable

#: the source a publication is recorded with in the state directory: withdrawn, never restored
PUBLISHED = "published"


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
