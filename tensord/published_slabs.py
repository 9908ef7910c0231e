"""Replicas in a client's own memory, published without a copy (the R-Fork seed).

A process (an inference engine) publishes tensors that stay where they are: the daemon records
a version whose only bytes are the publisher's allocations (GPU or host), and hands readers on
this node the publisher's IPC handles (`PublishedIpcReplica`, GPU memory), and readers elsewhere (and
of host memory) the publisher's Transfer Engine registration (`PublishedReplica`); remote
readers pin it through this daemon like any replica. The replica belongs to the publishing
connection: it is withdrawn when the publisher unpublishes (after the readers' pins drain) or
its connection closes. It uses no daemon budget, is never evicted or restored after a
restart; the state directory records it only so that a daemon restarted after a crash
withdraws it from the registry.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterable
from typing import Any

from tensord.memory import Slab
from tensord.records import Held
from tensord_contract.descriptors import PublishedIpcReplica, PublishedReplica
from tensord_contract.errors import Unavailable

#: the source a publication is recorded with in the state directory: withdrawn, never restored
PUBLISHED = "published"


class PublishedSlab(Slab):
    """A version's bytes in the publishing process's memory: no budget, no state, no copy."""

    published = True

    def __init__(self, replica: PublishedIpcReplica | None, exposed: PublishedReplica | None, owner: str) -> None:
        """`replica`: the CUDA IPC export (readers on this node); `exposed`: the publisher's
        Transfer Engine registration (readers anywhere). At least one."""
        if replica is None and exposed is None:
            raise ValueError("a publication needs an IPC export or a Transfer Engine registration")
        self.generation = secrets.randbits(62)
        self.replica = None if replica is None else dataclasses.replace(replica, generation=self.generation)
        self.exposed = None if exposed is None else dataclasses.replace(exposed, generation=self.generation)
        self.device = exposed.device if exposed is not None else f"cuda:{replica.device}"  # type: ignore[union-attr]
        self.nbytes = (exposed or replica).nbytes  # type: ignore[union-attr]
        self.owner = owner  # who published it (the session's peer)
        # sent with every open: built once
        self._local = (self.replica or self.exposed).to_wire()  # type: ignore[union-attr]
        self._remote = None if self.exposed is None else self.exposed.to_wire()

    def descriptor(self) -> tuple[dict[str, Any], list[int]]:
        return self._local, []

    def remote_descriptor(self) -> dict[str, Any]:
        """How a reader on another node reaches it: through the publisher's Transfer Engine."""
        if self._remote is None:
            raise Unavailable(
                f"this replica lies in the memory of the process that published it ({self.owner}), "
                "which exposed it to readers on its node only (its Transfer Engine did not start)"
            )
        return self._remote

    def address(self, *, writable: bool) -> int:
        raise Unavailable(f"this replica lies in the memory of the process that published it ({self.owner})")

    def free(self) -> None:
        """Nothing to free: the publisher owns the memory."""


def published(held: Iterable[Held]) -> list[dict[str, Any]]:
    """The publications among `held`, for `status`."""
    return [
        {
            "name": h.key[0],
            "version": h.key[1],
            "device": h.slab.device,
            "bytes": h.manifest.data_bytes,
            "pins": h.pins,
            "owner": h.slab.owner,
        }
        for h in held
        if isinstance(h.slab, PublishedSlab)
    ]
