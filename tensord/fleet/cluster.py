"""What a node does for sets it does not hold: choose a replica, pin it on its node, pull it.

Replica choice for a read through this gateway: replicas on this host first, then the node with
the fewest reads in flight through this gateway. Every remote pin is taken through a `Peer`; if
the peer's connection breaks, the pin is reported lost on release and the client retries
another replica. Pulls (`replicate`, pull-through) stream chunks from any holder, partial ones
included: `tensord.fleet`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from typing import Any

import numpy as np

from tensord.context import NodeContext
from tensord.fleet.pairs import Pairs
from tensord.fleet.policy import start_for, start_of
from tensord.fleet.pull import Pull
from tensord.fleet.seed import from_publication
from tensord.fleet.serve import Serving
from tensord.fleet.settings import Settings
from tensord.peers import Peers, RemotePin
from tensord.records import Held
from tensord.registry.base import NodeRecord, Replica
from tensord.store import Store
from tensord_contract.errors import NotFound, OutOfCapacity, TensordError, TransferError, Unavailable
from tensord_contract.manifest import Manifest
from tensord_contract.messages import OpenReply
from tensord_dataplane.fingerprint import mismatched_rows

log = logging.getLogger(__name__)

#: Why a pin on one peer fails where the next replica's may not: the peer is unreachable
#: (Unavailable) or retired the version since the registry listed it (NotFound). Not
#: `Retryable`, which groups failures of moving bytes; a pin moves none.
NEXT_REPLICA = (Unavailable, NotFound)


class Cluster:
    def __init__(
        self,
        store: Store,
        context: NodeContext,
        peers: Peers,
        *,
        settings: Settings | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.store, self.context, self.peers = store, context, peers
        self.node, self.registry = context.node, context.registry
        self.settings = settings if settings is not None else Settings()
        self.host = socket.gethostname()
        self.serving = Serving(store, context, slots=self.settings.slots, wait=self.settings.wait)
        self.pairs_timeout = 60.0
        self.pairs = Pairs(context.node, host, timeout=self.pairs_timeout) if self.settings.pairs else None
        self.serving.pusher = self.pairs
        self.pulls: dict[tuple[str, int], asyncio.Task[Held]] = {}
        self.running: dict[tuple[str, int], Pull] = {}
        self.finished: dict[tuple[str, int], dict[str, Any]] = {}
        self._manifests: dict[tuple[str, int], Manifest] = {}  # committed in the registry
        self._checked: dict[tuple[str, str, int, int], bool] = {}  # holders whose manifest matched

    async def candidates(self, name: str, version: int, exclude: list[str]) -> list[tuple[Replica, NodeRecord]]:
        nodes = {n.node: n for n in await self.registry.nodes()}
        found = [
            (r, nodes[r.node])
            for r in await self.registry.replicas(name, version)
            if r.node in nodes and r.node != self.node and r.node not in exclude
        ]
        if not found:
            raise NotFound(f"no live replica of {name} v{version} on another node", name=name, version=version)
        peers = {r.node: self.peers.get(r.node, n.control) for r, n in found if n.control.startswith("tcp:")}
        found = [(r, n) for r, n in found if r.node in peers]
        found.sort(key=lambda rn: (rn[1].host != self.host, peers[rn[0].node].busy))
        return found

    async def pin_remote(
        self, name: str, version: int, exclude: list[str], have: frozenset[tuple[int, int]] | None = None
    ) -> tuple[OpenReply, RemotePin]:
        """Pin `version` on the best other node; its open reply (the manifest committed in the
        registry unless `have` names it, the holder's descriptor) and the pin. A holder whose
        own manifest differs from the registry's (layout or fingerprints) is refused: a verified
        read checks what was committed, never what the serving peer says it holds."""
        committed = await self.committed(name, version)
        errors = []
        for replica, record in await self.candidates(name, version, exclude):
            peer = self.peers.get(replica.node, record.control)
            checked = (replica.node, name, version, replica.generation)
            compared = frozenset({(version, replica.generation)}) if checked in self._checked else frozenset()
            try:  # its manifest is left out only where this gateway compared it before
                reply, pin = await peer.pin(name, version, compared)
            except NEXT_REPLICA as exc:
                errors.append(f"{replica.node}: {exc.message}")
                continue
            why = self._differs(reply.manifest, committed)
            if why:
                log.warning("refusing the replica of %s v%d on %s: %s", name, version, replica.node, why)
                errors.append(f"{replica.node}: {why}")
                await peer.release(pin)
                continue
            if reply.manifest is not None:
                self._remember(self._checked, checked, True)
            known = have is not None and (version, reply.replica.get("generation")) in have
            peer.reading()
            return dataclasses.replace(reply, manifest=None if known else committed.wire), pin
        raise TransferError(
            f"no replica of {name} v{version} could be pinned: {'; '.join(errors)}", name=name, version=version
        )

    async def committed(self, name: str, version: int) -> Manifest:
        """The manifest committed in the registry (cached: a committed manifest never changes)."""
        found = self._manifests.get((name, version))
        if found is None:
            found = await self.registry.manifest(name, version)
            self._remember(self._manifests, (name, version), found)
        return found

    @staticmethod
    def _differs(wire: Any, committed: Manifest) -> str:
        """Why a holder's manifest (None: not sent, already compared) is not the committed one."""
        if wire is None:
            return ""
        try:
            held = Manifest.from_wire(wire)
        except TensordError as exc:
            return f"its manifest is unreadable ({exc.message})"
        if (
            held.nbytes != committed.nbytes
            or held.table.to_wire() != committed.table.to_wire()
            or not np.array_equal(held.offsets, committed.offsets)
        ):
            return "it holds another layout than the registry's manifest"
        if held.fp_version == committed.fp_version and mismatched_rows(committed.fingerprints, held.fingerprints).size:
            return "its fingerprints are not the registry's: it holds other bytes"
        return ""

    @staticmethod
    def _remember(cache: dict[Any, Any], key: Any, value: Any, limit: int = 256) -> None:
        cache[key] = value
        while len(cache) > limit:
            del cache[next(iter(cache))]

    async def replicate(
        self,
        name: str,
        version: int,
        device: str | None,
        *,
        index: int | None = None,
        of: int = 1,
        peers: list[str] | None = None,
        rate: int | None = None,
        chunk: int | None = None,
    ) -> Held:
        """Pull a copy of a committed version into a slab here and advertise it; streamed
        (`tensord.fleet.pull`): other nodes may read its chunks while it fills. `index` of `of`:
        this node's place among the targets of a fan-out (`peers`), which sets where in the
        set it starts. `rate`: bytes/s this pull may read (None: fleet.rate_limit); `chunk`:
        its chunk size (None: fleet.chunk_bytes; every target of a fan-out gets the same). A
        pull of the same version already under way here is joined."""
        held = self.store.holds(name, version)
        if held is not None:
            return held
        key = (name, version)
        task = self.pulls.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._pull(name, version, device, index, of, peers or [], rate, chunk)
            )
            self.pulls[key] = task
            task.add_done_callback(lambda _: self.pulls.pop(key, None))
        return await asyncio.shield(task)

    async def _pull(
        self,
        name: str,
        version: int,
        device: str | None,
        index: int | None,
        of: int,
        peers: list[str],
        rate: int | None,
        chunk: int | None,
    ) -> Held:
        manifest = await self.registry.manifest(name, version)
        here = device
        replicas = await self.registry.replicas(name, version)
        if here is None:  # like the replicas, where this node has that device; else host memory
            here = next((r.device for r in replicas if r.device in self.store.devices), "cpu")
        if replicas and all(not r.transport for r in replicas):  # no slab to stream from: a publication?
            try:
                pinned = await self.pin_remote(name, version, [])
            except TransferError:  # none could be pinned for reading: streamed over pair groups, if any
                pinned = None
            if pinned is not None:
                seeded = await from_publication(self.store, self.context, manifest, here, pinned)
                if seeded is not None:
                    return seeded
        grid = chunk or self.settings.chunk_for(manifest.nbytes)
        count = max(1, -(-manifest.nbytes // grid))
        start = start_of(index, of, count) if index is not None else start_for(self.node, count)
        pull = Pull(
            self.store,
            self.context,
            self.serving,
            self.pairs,
            manifest,
            here,
            settings=self.settings,
            host=self.host,
            token=self.peers.token,
            pairs_timeout=self.pairs_timeout,
            start=start,
            peers=peers,
            rate=rate,
            chunk=chunk,
        )
        self.running[(name, version)] = pull
        t0 = time.monotonic()
        try:
            held = await pull.run()
        except TensordError as exc:  # no room stays a capacity error: the caller may free some
            kind = OutOfCapacity if isinstance(exc, OutOfCapacity) else TransferError
            raise kind(f"cannot replicate {name} v{version}: {exc.message}", name=name, version=version) from exc
        finally:
            self.running.pop((name, version), None)
        seconds = time.monotonic() - t0
        self.finished[(name, version)] = {**pull.status(), "seconds": seconds}
        while len(self.finished) > 64:
            self.finished.pop(next(iter(self.finished)))
        log.info(
            "replicated %s v%d: %d bytes in %.2f s (%.2f GB/s) from %s",
            name,
            version,
            manifest.nbytes,
            seconds,
            manifest.nbytes / seconds / 1e9 if seconds > 0 else 0.0,
            ", ".join(f"{n}: {b}" for n, b in sorted(pull.progress.sourced.items())) or "nobody",
        )
        return held

    def pulls_status(self) -> list[dict[str, Any]]:
        """The pulls under way here, as `status` shows them."""
        return [p.status() for p in self.running.values()]

    def finished_pull(self, name: str, version: int) -> dict[str, Any] | None:
        """How the last pull of `version` here went (seconds, sources, phases, chunk), if kept."""
        return self.finished.get((name, version))

    def close(self) -> None:
        for task in self.pulls.values():
            task.cancel()
        if self.pairs is not None:
            self.pairs.close()
