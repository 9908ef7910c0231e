"""What a node does for sets it does not hold: choose a replica, pin it on its node, pull it.

Replica choice: replicas on this host first, then the node with the fewest reads in flight
through this gateway. Every remote pin is taken through a `Peer`; if the peer's connection
breaks, the pin is reported lost on release and the client retries another replica.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import numpy as np

from sdk.dataplane.descriptors import RemoteReplica, replica_from_wire
from sdk.errors import NotFound, ProtocolError, TensordError, TransferError, Unavailable
from sdk.manifest import Manifest
from sdk.transport.base import Batch
from tensord.memory import Slab, own_view
from tensord.peers import Peers, RemotePin
from tensord.registry.base import NodeRecord, Replica
from tensord.store import Held, Store

log = logging.getLogger(__name__)


class Cluster:
    def __init__(self, store: Store, peers: Peers) -> None:
        self.store, self.peers = store, peers
        self.host = socket.gethostname()

    async def candidates(self, name: str, version: int, exclude: list[str]) -> list[tuple[Replica, NodeRecord]]:
        nodes = {n.node: n for n in await self.store.registry.nodes()}
        found = [
            (r, nodes[r.node])
            for r in await self.store.registry.replicas(name, version)
            if r.node in nodes and r.node != self.store.node and r.node not in exclude
        ]
        if not found:
            raise NotFound(f"no live replica of {name} v{version} on another node", name=name, version=version)
        peers = {r.node: self.peers.get(r.node, n.control) for r, n in found if n.control.startswith("tcp:")}
        found = [(r, n) for r, n in found if r.node in peers]
        found.sort(key=lambda rn: (rn[1].host != self.host, peers[rn[0].node].busy))
        return found

    async def pin_remote(
        self, name: str, version: int, exclude: list[str], have: Any = None
    ) -> tuple[dict[str, Any], RemotePin]:
        """Pin `version` on the best other node; its open reply (manifest unless `have` names
        it, descriptor) and the pin."""
        errors = []
        for replica, record in await self.candidates(name, version, exclude):
            peer = self.peers.get(replica.node, record.control)
            try:
                result, pin = await peer.pin(name, version, have)
            except (Unavailable, NotFound) as exc:  # dead, or retired there since: next one
                errors.append(f"{replica.node}: {exc.message}")
                continue
            peer.busy += 1
            return result, pin
        raise TransferError(
            f"no replica of {name} v{version} could be pinned: {'; '.join(errors)}", name=name, version=version
        )

    async def release(self, pin: RemotePin) -> bool:
        pin.peer.busy = max(0, pin.peer.busy - 1)
        return await pin.peer.release(pin)

    async def replicate(self, name: str, version: int, device: str | None) -> Held:
        """Pull a copy of a committed version into a slab here and advertise it."""
        held = self.store.held.get((name, version))
        if held is not None and held.live:
            return held
        transport = self.store.transport
        if transport is None:
            raise Unavailable(f"node {self.store.node} has no Transfer Engine to pull with")
        errors: list[str] = []
        exclude: list[str] = []
        while True:
            try:
                result, pin = await self.pin_remote(name, version, exclude)
            except (NotFound, TransferError) as exc:
                raise TransferError(f"cannot replicate {name} v{version}: {exc.message} {errors}") from exc
            try:
                manifest = await asyncio.to_thread(Manifest.from_wire, result.get("manifest"))
                source = replica_from_wire(result.get("replica"))
                if not isinstance(source, RemoteReplica) or manifest.nbytes > source.nbytes:
                    raise ProtocolError(f"node {pin.node} described {name} v{version} wrongly")
            except ProtocolError as exc:
                await self.release(pin)
                errors.append(f"{pin.node}: {exc.message}")
                exclude.append(pin.node)
                continue
            here = source.device if source.device in self.store.budgets.limit else "cpu"
            slab = self.store.allocate(device or here, manifest.nbytes, f"{name}@{version}")
            try:
                address = self.store.expose(slab, writable=True)
                batch = Batch.of([]) if not manifest.nbytes else Batch(
                    np.array([address]), np.array([source.address]), np.array([manifest.nbytes])
                )  # fmt: skip
                await asyncio.to_thread(transport.read, source.session, batch)
                intact = await self.release(pin)
                pin = None  # type: ignore[assignment]
                if not intact:
                    raise TransferError(f"node {source.node} lost its pin during the read")
                await asyncio.to_thread(_verify, slab, manifest)
                self.store.hide(slab)
                return await self.store.adopt(manifest, slab)
            except TensordError as exc:
                errors.append(f"{source.node}: {exc.message}")
                exclude.append(source.node)
                if pin is not None:
                    await self.release(pin)
                self.store.discard(slab)


def _verify(slab: Slab, manifest: Manifest) -> None:
    """Check every fingerprint of a pulled copy in bulk, where it lies (GPU copies on the GPU)."""
    view = own_view(slab)
    try:
        actual = view.fingerprints(manifest.offsets, manifest.sizes)
        if manifest.fingerprints is not None:
            bad = np.flatnonzero(actual != manifest.fingerprints)
            if len(bad):
                key = manifest.names[int(bad[0])]
                raise TransferError(
                    f"tensor {key!r} of {manifest.name} v{manifest.version} arrived with a wrong fingerprint"
                )
    finally:
        view.close()
