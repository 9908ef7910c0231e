"""Replicating a publication: its only bytes lie in the publishing process's memory, so a
target node pins it on the publisher's daemon, reads it one-sided from the publisher's
Transfer Engine into a slab of its own (the publication is the seed, as in SGLang R-Fork),
checks every fingerprint and holds the copy as its replica. Streaming pulls (`fleet.pull`)
serve chunks from daemons' slabs; a publication has none, so it is read whole."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from tensord.context import NodeContext
from tensord.memory import own_view
from tensord.peers import RemotePin
from tensord.records import Held
from tensord.store import Store
from tensord_contract.descriptors import PublishedReplica, replica_from_wire
from tensord_contract.errors import IntegrityError, TransferError
from tensord_contract.manifest import Manifest
from tensord_contract.messages import OpenReply
from tensord_dataplane.fingerprint import mismatched_rows

log = logging.getLogger(__name__)


async def from_publication(
    store: Store,
    context: NodeContext,
    manifest: Manifest,
    device: str,
    pinned: tuple[OpenReply, RemotePin],
) -> Held | None:
    """Copy the publication pinned (`pinned`: the holder's open reply and the pin) into a slab
    on `device` and hold it; None (the pin given back) if what was pinned is not a publication.
    TransferError if the publisher withdrew it or went away during the copy."""
    result, pin = pinned
    released = False
    try:
        replica = replica_from_wire(result.replica)
        if not isinstance(replica, PublishedReplica):
            return None
        transport = context.transport
        if transport is None or not store.reaches(device):
            raise TransferError(f"node {context.node} has no Transfer Engine for {device} memory to read a publication")
        from tensord_dataplane.published import PublishedAccess

        name, version = manifest.name, manifest.version
        reader = PublishedAccess(replica, manifest, transport)
        await store.make_room(device, manifest.nbytes)
        slab = store.allocate(device, manifest.nbytes, f"{name}@{version}<")
        try:
            address = store.expose(slab, writable=True)
            offsets, sizes = manifest.offsets, manifest.sizes
            await asyncio.to_thread(reader.read_registered, address + offsets.astype(np.int64), offsets, sizes, device)
            bad = await asyncio.to_thread(_wrong_rows, slab, manifest)
            released = True
            intact = await pin.release()
            if not intact:
                raise TransferError(
                    f"{name} v{version} was withdrawn by its publisher during the copy", name=name, version=version
                )
            if len(bad):
                raise IntegrityError(
                    f"{name} v{version}: {len(bad)} tensors read from the publication have wrong fingerprints",
                    name=name,
                    version=version,
                )
        except BaseException:
            store.discard(slab)
            raise
        log.info("copied %s v%d (%d bytes) from the publication on node %s", name, version, manifest.nbytes, pin.node)
        return await store.adopt(manifest, slab)
    finally:
        if not released:
            await pin.release()


def _wrong_rows(slab: Any, manifest: Manifest) -> np.ndarray:
    view = own_view(slab)
    try:
        return mismatched_rows(
            manifest.fingerprints, view.fingerprints(manifest.offsets, manifest.sizes, manifest.fp_version)
        )
    finally:
        view.close()
