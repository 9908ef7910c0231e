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

from sdk.errors import NotFound, TensordError, TransferError, Unavailable
from sdk.manifest import Manifest
from sdk.tensors import fingerprints
from sdk.transport.base import Entry
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

    async def pin_remote(self, name: str, version: int, exclude: list[str]) -> tuple[dict[str, Any], RemotePin]:
        """Pin `version` on the best other node; its open reply (manifest, descriptor) and the pin."""
        errors = []
        for replica, record in await self.candidates(name, version, exclude):
            peer = self.peers.get(replica.node, record.control)
            try:
                result, pin = await peer.pin(name, version)
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
            manifest = Manifest.from_wire(result["manifest"])
            source = result["replica"]
            here = source.get("device") if source.get("device") in self.store.budgets.limit else "cpu"
            slab = self.store.allocate(device or here, manifest.nbytes, f"{name}@{version}")
            try:
                address = self.store.expose(slab, writable=True)
                entry = Entry(address, int(source["address"]), manifest.nbytes)
                await asyncio.to_thread(transport.read, source["session"], [entry])
                intact = await self.release(pin)
                pin = None  # type: ignore[assignment]
                if not intact:
                    raise TransferError(f"node {source['node']} lost its pin during the read")
                await asyncio.to_thread(_verify, slab, manifest)
                self.store.hide(slab)
                return await self.store.adopt(manifest, slab)
            except TensordError as exc:
                errors.append(f"{source.get('node')}: {exc.message}")
                exclude.append(source.get("node"))
                if pin is not None:
                    await self.release(pin)
                self.store.discard(slab)


def _verify(slab: Slab, manifest: Manifest) -> None:
    """Check every fingerprint of a pulled copy, where it lies (GPU copies on the GPU)."""
    view = own_view(slab)
    try:
        actual = fingerprints([view.view(spec) for spec in manifest.tensors])
        for spec, fp in zip(manifest.tensors, actual, strict=True):
            if spec.fingerprint is not None and fp != spec.fingerprint:
                raise TransferError(
                    f"tensor {spec.name!r} of {manifest.name} v{manifest.version} arrived with a wrong fingerprint"
                )
    finally:
        view.close()
