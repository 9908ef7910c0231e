"""The node's store: slabs it holds, reservations being written, pins, budgets, retention,
eviction, and the catalogue of what it holds in the state directory.

Names and versions live in the registry; the store keeps the memory. A version becomes
visible only at commit, after its bytes are written and its slab sealed. A retired or deleted
version is no longer resolvable, and its slab is freed when its last pin goes.

Every version held here is recorded in the state directory's catalogue (when there is one)
before it becomes visible, and forgotten when it leaves the node for good (deleted, retired,
or evicted while another node holds it), so a restarted daemon knows what to restore.

Eviction (`memory.eviction = "lru"`): a reservation, or a restore from a file, that does not fit
its device's budget first evicts unpinned versions on that device, least recently read first,
that can come back: another live node holds a replica, or the checkpoint it was loaded from may
be read again (then the version stays in the registry and in the catalogue, marked evicted, and
its next read on this node re-reads it). If evicting every such version would not make room,
nothing is evicted and the request fails with OutOfCapacity.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from sdk.dataplane.cuda import current
from sdk.transport.base import Transport
from tensord.checkpoint import recorded_checkpoint
from tensord.memory import Budgets, HostSlab, Slab, allocate, cuda_blocks
from tensord.metrics import Metrics
from tensord.registry.base import Registry, Replica
from tensord.state import Catalogue, Record
from tensord_contract.errors import InvalidArgument, NotFound, OutOfCapacity, TensordError, Unavailable
from tensord_contract.manifest import ALIGN, MAX_BYTES, Manifest, Table

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Held:
    """One version held on this node."""

    manifest: Manifest
    slab: Slab
    pins: int = 0
    live: bool = True  # False once retired or deleted: freed when pins reach 0
    advertised: bool = False  # True once the registry knows it (reconcile trusts no other)
    last_read: float = field(default_factory=time.monotonic)  # when last pinned (or created): LRU

    @property
    def key(self) -> tuple[str, int]:
        return self.manifest.name, self.manifest.version


@dataclass(eq=False)
class Reservation:
    id: int
    name: str
    manifest: Manifest  # version 0 until commit
    slab: Slab
    origin: str
    started: float = field(default_factory=time.time)


class Store:
    def __init__(
        self,
        node: str,
        registry: Registry,
        budgets: Budgets,
        *,
        retention: int = 0,
        huge_pages: bool = False,
        transport: Transport | None = None,
        catalogue: Catalogue | None = None,
        keep_manifests: bool = False,
        eviction: str = "none",
        allowed_roots: Sequence[str] = (),
        metrics: Metrics | None = None,
    ) -> None:
        """`catalogue`: where held versions are recorded (the state directory's), with their
        manifests when `keep_manifests` (the embedded registry's state). `eviction`: "lru" or
        "none". `allowed_roots`: checkpoints that may be read again (ingest.allowed_roots)."""
        self.node, self.registry, self.budgets, self.retention = node, registry, budgets, retention
        self.huge_pages = huge_pages
        self.transport = transport
        self.catalogue, self.keep_manifests = catalogue, keep_manifests
        self.eviction, self.allowed_roots = eviction, tuple(allowed_roots)
        self.metrics = metrics if metrics is not None else Metrics()
        self.held: dict[tuple[str, int], Held] = {}
        #: versions evicted here that come back from their checkpoint on their next read
        self.evicted: dict[tuple[str, int], tuple[Manifest, str]] = {}
        self.reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._registered: dict[int, tuple[Slab, int]] = {}  # id(slab) -> (slab, address)
        self._ranges: dict[int, list[int]] = {}  # registered base -> [length, users]

    # -- the Transfer Engine's view of slabs --------------------------------------------------
    def expose(self, slab: Slab, *, writable: bool) -> int:
        """Register the slab with the Transfer Engine (read-only once committed); its address."""
        if self.transport is None or not self.transport.supports(slab.device):
            raise Unavailable(f"node {self.node} has no Transfer Engine for {slab.device} memory")
        self.hide(slab)
        address = slab.address(writable=writable)
        base, length = slab.registration(address)
        users = self._ranges.setdefault(base, [length, 0])
        if users[1] == 0:
            with current(slab.device):
                self.transport.register(base, length)
        users[1] += 1
        self._registered[id(slab)] = (slab, address)
        return address

    def hide(self, slab: Slab) -> None:
        entry = self._registered.pop(id(slab), None)
        if entry is not None and self.transport is not None:
            base, _ = slab.registration(entry[1])
            users = self._ranges[base]
            users[1] -= 1
            if users[1] == 0:
                del self._ranges[base]
                with current(slab.device):
                    self.transport.unregister(base)
        slab.unmap()

    def allocate(self, device: str, nbytes: int, label: str) -> Slab:
        device = self.budgets.check_device(device)
        nbytes = max(nbytes, ALIGN)
        self.budgets.take(device, nbytes)
        try:
            slab = allocate(device, nbytes, label, huge_pages=self.huge_pages)
        except BaseException:
            self.budgets.give(device, nbytes)
            raise
        self._fit_idle(device)
        return slab

    def huge_page_bytes(self) -> int:
        """Bytes of host slabs (held or reserved) that lie in huge pages."""
        slabs = [h.slab for h in self.held.values()] + [r.slab for r in self.reservations.values()]
        return sum(s.size for s in slabs if isinstance(s, HostSlab) and s.huge)

    # -- writing ----------------------------------------------------------------------------
    async def reserve(self, name: str, device: str, table: Table, origin: str) -> Reservation:
        total = float(table.sizes.astype(np.float64).sum()) + ALIGN * len(table)  # no int64 wrap
        if total >= MAX_BYTES:
            raise OutOfCapacity(f"{name}: {total:.3g} bytes requested, more than a slab holds", requested=int(total))
        offsets, nbytes = table.layout()
        rid = next(self._ids)
        await self.make_room(device, nbytes)
        slab = self.allocate(device, nbytes, f"{name}#{rid}")
        manifest = Manifest(name, 0, table, offsets, slab.nbytes, created=time.time(), origin=origin, check=None)
        self.reservations[rid] = r = Reservation(rid, name, manifest, slab, origin)
        log.debug("reserved %d bytes on %s for %s (#%d)", nbytes, device, name, rid)
        return r

    def reservation(self, rid: object) -> Reservation:
        if not isinstance(rid, int) or rid not in self.reservations:
            raise NotFound(f"no open reservation {rid!r}")
        return self.reservations[rid]

    async def commit(self, rid: int, fingerprints: np.ndarray) -> Held:
        r = self.reservation(rid)
        count = len(r.manifest)
        if fingerprints.dtype != np.uint64 or fingerprints.shape != (count,):
            raise InvalidArgument(f"commit needs one 64-bit fingerprint per tensor ({count})")
        self.hide(r.slab)  # a writable mapping would make the seal fail
        r.slab.seal()
        del self.reservations[rid]
        version = 0
        try:
            version = await self.registry.allocate_version(r.name)
            m = r.manifest
            manifest = m.committed(version, fingerprints, time.time())
            await self._record(manifest, r.slab.device, manifest.origin)
            held = Held(manifest, r.slab)
            self.held[held.key] = held  # before the registry, so whoever resolves it finds it
            if self.transport is not None and self.transport.supports(r.slab.device):
                self.expose(r.slab, writable=False)
            await self.registry.commit(manifest, self.replica(held))
            held.advertised = True
        except BaseException:
            self.held.pop((r.name, version), None)
            self._free(r.slab)
            if version and self.catalogue is not None:
                await self.catalogue.forget(r.name, version)
            raise
        log.info("committed %s v%d: %d tensors, %d bytes on %s", r.name, version, count, m.nbytes, r.slab.device)
        try:
            await self._retain(r.name)
        except TensordError as exc:  # the version stands; retention runs again at the next commit
            log.warning("retention for %s skipped: %s", r.name, exc.message)
        return held

    def abort(self, rid: int) -> None:
        r = self.reservations.pop(rid, None)
        if r is not None:
            self._free(r.slab)
            log.debug("aborted reservation #%d for %s", rid, r.name)

    def replica(self, held: Held) -> Replica:
        m, slab = held.manifest, held.slab
        entry = self._registered.get(id(slab))
        session = self.transport.session if self.transport is not None and entry else ""
        return Replica(
            m.name,
            m.version,
            self.node,
            slab.device,
            transport=session,
            address=entry[1] if entry else 0,
            nbytes=slab.nbytes,
            generation=slab.generation,
        )

    def discard(self, slab: Slab) -> None:
        """Free a slab that never became a version (a failed pull)."""
        self._free(slab)

    async def adopt(self, manifest: Manifest, slab: Slab, *, source: str = "peer") -> Held:
        """Hold a copy of a committed version that came from another node (or, `source` its
        origin, was read again from its checkpoint), and advertise it."""
        self.hide(slab)
        slab.seal()
        held = self.held.get((manifest.name, manifest.version))
        if held is not None and held.live:
            self._free(slab)
            return held
        held = Held(manifest, slab)
        self.held[held.key] = held
        try:
            await self._record(manifest, slab.device, source)
            if self.transport is not None and self.transport.supports(slab.device):
                self.expose(slab, writable=False)
            await self.registry.add_replica(self.replica(held))
            held.advertised = True
        except BaseException as exc:
            self._drop(held)
            if isinstance(exc, NotFound):  # deleted meanwhile: nothing left to hold
                await self._forget(*held.key)
            raise
        self.evicted.pop(held.key, None)
        if source == "peer":
            self.metrics.moved("transfer_engine", "write", manifest.data_bytes)
        log.info("holding a replica of %s v%d on %s (from %s)", manifest.name, manifest.version, slab.device, source)
        return held

    async def _record(self, manifest: Manifest, device: str, source: str, *, evicted: bool = False) -> None:
        """Note in the state directory that this node holds (or evicted) a version."""
        if self.catalogue is None:
            return
        known = self.catalogue.get(manifest.name, manifest.version)
        if known is not None and (known.device, known.source, known.evicted) == (device, source, evicted):
            return  # restored as it was recorded: nothing to write
        wire = manifest.to_wire() if self.keep_manifests else None
        await self.catalogue.put(Record(manifest.name, manifest.version, device, source, evicted, wire))

    # -- reading ----------------------------------------------------------------------------
    async def resolve(self, name: str, version: int | None) -> Held:
        """The locally held version `version` names; NotFound if this node does not hold it."""
        held = self.held.get((name, await self.resolve_version(name, version)))
        if held is None or not held.live:
            raise NotFound(f"{name} v{version or 'latest'} is not held on node {self.node}", name=name, version=version)
        return held

    async def resolve_version(self, name: str, version: int | None) -> int:
        """Ask the registry; while it is unreachable, answer from what this node holds."""
        try:
            return await self.registry.resolve(name, version)
        except Unavailable:
            local = [v for (n, v), h in self.held.items() if n == name and h.live]
            if version is not None and version in local:
                return version
            if version is None and local:
                return max(local)
            raise

    def pin(self, held: Held) -> None:
        held.pins += 1
        held.last_read = time.monotonic()

    def unpin(self, held: Held) -> None:
        held.pins -= 1
        if held.pins == 0 and not held.live:
            self._drop(held)

    # -- removal ----------------------------------------------------------------------------
    async def delete(self, name: str, version: int | None) -> int:
        versions = [version] if version is not None else await self.registry.versions(name)
        deleted = 0
        for v in versions:
            deleted += await self.registry.delete_version(name, v)
            held = self.held.get((name, v))
            if held is not None and held.live:
                self._retire(held)
            await self._forget(name, v)
        return deleted

    async def _forget(self, name: str, version: int) -> None:
        """A version left this node for good: nothing to restore or recover."""
        self.evicted.pop((name, version), None)
        if self.catalogue is not None:
            await self.catalogue.forget(name, version)

    async def _retain(self, name: str) -> None:
        """Keep the newest `retention` versions of `name` (0: keep all)."""
        if not self.retention:
            return
        versions = await self.registry.versions(name)
        for v in versions[: -self.retention]:
            await self.registry.delete_version(name, v)
            held = self.held.get((name, v))
            if held is not None and held.live:
                log.info("retention: retiring %s v%d (%d pins)", name, v, held.pins)
                self._retire(held)
            await self._forget(name, v)

    def _retire(self, held: Held) -> None:
        held.live = False
        if held.pins == 0:
            self._drop(held)

    def _drop(self, held: Held) -> None:
        self.held.pop(held.key, None)
        self._free(held.slab)

    def _free(self, slab: Slab) -> None:
        self.hide(slab)
        slab.free()
        self.budgets.give(slab.device, slab.nbytes)
        self._fit_idle(slab.device)

    def _fit_idle(self, device: str) -> None:
        """Keep the GPU blocks held idle for reuse within the device's unused budget."""
        if device.startswith("cuda"):
            cuda_blocks.shrink(device, self.budgets.limit[device] - self.budgets.used[device])

    async def reconcile(self) -> None:
        """Retire held versions whose manifest left the registry (deleted by another node)."""
        for held in [h for h in self.held.values() if h.live and h.advertised]:
            name, version = held.key
            if version not in await self.registry.versions(name):
                log.info("%s v%d was deleted elsewhere: retiring the local replica", name, version)
                self._retire(held)
                await self._forget(name, version)

    # -- eviction ---------------------------------------------------------------------------
    async def make_room(self, device: str, nbytes: int) -> None:
        """With eviction on, evict unpinned versions on `device` that can come back, least
        recently read first, until `nbytes` more fit its budget. Evicts nothing if that would
        not make room: the allocation then fails with OutOfCapacity, as without eviction."""
        device = self.budgets.check_device(device)
        nbytes = max(nbytes, ALIGN)
        need = self.budgets.used[device] + nbytes - self.budgets.limit[device]
        if need <= 0 or self.eviction != "lru":
            return
        plan: list[tuple[Held, str]] = []
        freed = 0
        candidates = [h for h in self.held.values() if h.live and h.pins == 0 and h.slab.device == device]
        for held in sorted(candidates, key=lambda h: h.last_read):
            reason = await self._recoverable(held)
            if reason is not None:
                plan.append((held, reason))
                freed += held.slab.nbytes
                if freed >= need:
                    break
        if freed < need:
            log.info(
                "%s: %d bytes do not fit and evicting every version that could go frees %d of the %d needed",
                device,
                nbytes,
                freed,
                need,
            )
            return
        for held, reason in plan:
            if held.live and held.pins == 0 and self.held.get(held.key) is held:  # unchanged meanwhile
                await self._evict(held, reason)

    async def _recoverable(self, held: Held) -> str | None:
        """Why `held` may be evicted: "replica" (another live node holds it), "checkpoint" (its
        file may be read again); None if it may not."""
        name, version = held.key
        try:
            others = {r.node for r in await self.registry.replicas(name, version) if r.node != self.node}
            if others and others & {n.node for n in await self.registry.nodes()}:
                return "replica"
        except Unavailable:
            pass  # no word on other replicas: only the checkpoint counts
        try:
            recorded_checkpoint(held.manifest.origin, self.allowed_roots)
        except TensordError:
            return None
        return "checkpoint"

    async def _evict(self, held: Held, reason: str) -> None:
        name, version = held.key
        device, nbytes = held.slab.device, held.slab.nbytes
        idle = time.monotonic() - held.last_read
        try:
            await self.registry.remove_replica(name, version, self.node, device)
        except Unavailable as exc:  # readers elsewhere find the pin refused and try another
            log.warning("evicting %s v%d: cannot withdraw its replica now: %s", name, version, exc.message)
        self._drop(held)
        if reason == "checkpoint":
            self.evicted[held.key] = (held.manifest, device)
            try:
                await self._record(held.manifest, device, held.manifest.origin, evicted=True)
            except Unavailable as exc:  # it stays recorded as held: a restart reads it again
                log.warning("%s", exc.message)
        else:
            await self._forget(name, version)
        self.metrics.evictions.labels(device, reason).inc()
        self.metrics.evicted_bytes.labels(device).inc(nbytes)
        log.info(
            "evicted %s v%d (%d bytes on %s, last read %.0f s ago): %s",
            name,
            version,
            nbytes,
            device,
            idle,
            "another node holds it" if reason == "replica" else f"comes back from {held.manifest.origin}",
        )

    def close(self) -> None:
        """Free everything (shutdown): reservations, then held slabs, pinned or not."""
        for rid in list(self.reservations):
            self.abort(rid)
        for held in list(self.held.values()):
            self._drop(held)
