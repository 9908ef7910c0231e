"""The node's store: slabs it holds, reservations being written, budgets, retention; the
version table (`tensord.versions`: held, evicted, pins, the state directory's records) and
eviction (`tensord.eviction.Eviction`) are its parts.

Names and versions live in the registry; the store keeps the memory. A version becomes
visible only at commit, after its bytes are written and its slab sealed. A retired or deleted
version is no longer resolvable, and its slab is freed when its last pin goes.

Every version held here is recorded in the state directory's catalogue (when there is one)
before it becomes visible, and forgotten when it leaves the node for good (deleted, retired,
or evicted while another node holds it), so a restarted daemon knows what to restore.

One lifecycle per version: held (pinnable while live) → retired, deleted or evicted (no new
pins) → freed once, when its last pin goes (`Versions`). Eviction (`memory.eviction = "lru"`)
claims what it frees before it awaits anything."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensord import accounting
from tensord.eviction import Eviction
from tensord.memory import Budgets, CudaBlocks, HostSlab, Slab, allocate
from tensord.metrics import Metrics
from tensord.published_slabs import PUBLISHED, PublishedSlab, published
from tensord.records import Held, Reservation
from tensord.registrations import Registrations
from tensord.registry.base import Registry, Replica
from tensord.state import Catalogue
from tensord.versions import Versions
from tensord_contract.errors import InvalidArgument, NotFound, OutOfCapacity, TensordError, Unavailable
from tensord_contract.manifest import ALIGN, FINGERPRINT_VERSION, MAX_BYTES, Manifest, Table
from tensord_dataplane.transport.base import Transport

log = logging.getLogger(__name__)

_TABLES_KEPT = 8  # names whose newest table is kept after their versions go (`Store.known_table`)


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
        registrations: Registrations | None = None,
    ) -> None:
        """`catalogue`: where held versions are recorded (the state directory's), with their
        manifests when `keep_manifests` (the embedded registry's state). `eviction`: "lru" or
        "none". `allowed_roots`: checkpoints that may be read again (ingest.allowed_roots)."""
        self.node, self._registry, self._budgets, self.retention = node, registry, budgets, retention
        self.huge_pages = huge_pages
        self._engine = registrations if registrations is not None else Registrations(node)
        if transport is not None:
            self._engine.attach(transport)
        self.eviction, self.allowed_roots = eviction, tuple(allowed_roots)
        self._metrics = metrics if metrics is not None else Metrics()
        self.versions = Versions(self._free, catalogue, keep_manifests=keep_manifests)
        self._eviction = Eviction(
            self.versions, budgets, registry, self._metrics, node, policy=eviction, allowed_roots=allowed_roots
        )
        self._reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._blocks = CudaBlocks()  # GPU memory of freed slabs, kept for later ones
        self._tables: dict[str, Table] = {}  # the newest version's table of a few names, held or gone

    # -- what the rest of the daemon sees -----------------------------------------------------
    def attach_transport(self, transport: Transport | None) -> None:
        """Use `transport` from now on. Once, before any slab is exposed: the daemon starts its
        engine (slow) after building the store."""
        self._engine.attach(transport)

    def reaches(self, device: str) -> bool:
        """Whether the Transfer Engine can expose slabs on `device` to other nodes."""
        return self._engine.reaches(device)

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices this node serves (those with a budget)."""
        return tuple(self._budgets.limit)

    # the version table's lookups, pins and records (`Versions`), for the ops, fleet and restorer
    def holds(self, name: str, version: int) -> Held | None:
        return self.versions.holds(name, version)

    def lookup(self, name: str, version: int) -> Held | None:
        return self.versions.lookup(name, version)

    def known_table(self, name: object) -> Table | None:
        """The table of the newest version of `name` held here, if any: a new version of the
        same layout (a training step) reuses it instead of decoding its own."""
        if not isinstance(name, str):
            return None
        held = max(self.versions.live(name), key=lambda h: h.manifest.version, default=None)
        return self._tables.get(name) if held is None else held.manifest.table

    def _remember(self, manifest: Manifest) -> None:
        """Keep the newest table of a name after its versions go (a publisher that unpublishes
        before publishing the same layout again names it by its digest)."""
        self._tables.pop(manifest.name, None)
        self._tables[manifest.name] = manifest.table
        while len(self._tables) > _TABLES_KEPT:
            del self._tables[next(iter(self._tables))]

    def evicted(self, name: str, version: int) -> tuple[Manifest, str] | None:
        return self.versions.evicted(name, version)

    def note_evicted(self, manifest: Manifest, device: str) -> None:
        self.versions.note_evicted(manifest, device)

    def pin(self, held: Held, count: int = 1) -> None:
        self.versions.pin(held, count)

    def unpin(self, held: Held) -> None:
        self.versions.unpin(held)

    def retire(self, held: Held) -> None:
        self.versions.retire(held)

    async def forget(self, name: str, version: int) -> None:
        await self.versions.forget(name, version)

    async def make_room(self, device: str, nbytes: int) -> None:
        await self._eviction.make_room(device, nbytes)

    def status(self) -> dict[str, Any]:
        """What this node holds and uses, per device and in all (`tensord status`, metrics)."""
        live = self.versions.live()
        return {
            "devices": accounting.devices(live, self._budgets, self._blocks.idle_bytes),
            "huge_pages": self.huge_page_bytes(),
            "sets": len({h.manifest.name for h in live}),
            "versions": len(live),
            "pins": self.versions.pins,
            "reservations": len(self._reservations),
            "eviction": self.eviction,
            "evicted": self.versions.evicted_count,
            "published": published(live),
        }

    def descriptor(self, held: Held, *, local: bool) -> tuple[dict[str, Any], list[int]]:
        """How a reader reaches a held version: its slab (fds) here, else the Transfer Engine."""
        if isinstance(held.slab, PublishedSlab) and not local:
            return held.slab.remote_descriptor(), []
        return held.slab.descriptor() if local else (self._engine.remote(held.slab).to_wire(), [])

    def write_descriptor(self, r: Reservation, *, local: bool) -> tuple[dict[str, Any], list[int]]:
        """How a writer reaches a reservation's slab: here, else the Transfer Engine (writable)."""
        if local:
            return r.slab.descriptor()
        self.expose(r.slab, writable=True)
        return self._engine.remote(r.slab).to_wire(), []

    def expose(self, slab: Slab, *, writable: bool) -> int:
        """Expose the slab to other nodes through the Transfer Engine; its address there."""
        return self._engine.expose(slab, writable=writable)

    def _expose_if_room(self, slab: Slab) -> None:
        """Expose a held slab read-only; past the engine's limit it stays readable here only."""
        try:
            self.expose(slab, writable=False)
        except Unavailable as exc:
            log.warning("%s", exc.message)

    def allocate(self, device: str, nbytes: int, label: str) -> Slab:
        device = self._budgets.check_device(device)
        nbytes = max(nbytes, ALIGN)
        self._budgets.take(device, nbytes)
        try:
            slab = allocate(
                device, nbytes, label, self._blocks, huge_pages=self.huge_pages, pinned=self._budgets.pinned
            )
        except BaseException:
            self._budgets.give(device, nbytes)
            raise
        self._fit_idle(device)
        return slab

    def huge_page_bytes(self) -> int:
        """Bytes of host slabs (held or reserved) that lie in huge pages."""
        slabs = [h.slab for h in self.versions.all()] + [r.slab for r in self._reservations.values()]
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
        self._reservations[rid] = r = Reservation(rid, name, manifest, slab, origin)
        log.debug("reserved %d bytes on %s for %s (#%d)", nbytes, device, name, rid)
        return r

    def reservation(self, rid: object) -> Reservation:
        if not isinstance(rid, int) or rid not in self._reservations:
            raise NotFound(f"no open reservation {rid!r}")
        return self._reservations[rid]

    async def commit(self, rid: int, fingerprints: np.ndarray, fp_version: int = FINGERPRINT_VERSION) -> Held:
        """Commit reservation `rid` with its fingerprints, made with definition `fp_version`."""
        r = self.reservation(rid)
        count = len(r.manifest)
        if fingerprints.dtype != np.uint64 or fingerprints.shape != (count,):
            raise InvalidArgument(f"commit needs one 64-bit fingerprint per tensor ({count})")
        self._engine.hide(r.slab)  # a writable mapping would make the seal fail
        r.slab.seal()
        del self._reservations[rid]
        return await self.hold_new(r.manifest, r.slab, fingerprints, fp_version)

    async def hold_new(
        self, m: Manifest, slab: Slab, fingerprints: np.ndarray, fp_version: int = FINGERPRINT_VERSION
    ) -> Held:
        """Make the bytes in `slab` (laid out as `m`, uncommitted) the next version of its set:
        recorded, advertised, retention applied. The slab is freed if that fails."""
        version, held = 0, None
        try:
            version = await self._registry.allocate_version(m.name)
            manifest = m.committed(version, fingerprints, time.time(), fp_version)
            await self.versions.record(manifest, slab.device, PUBLISHED if slab.published else manifest.origin)
            held = Held(manifest, slab)
            self.versions.add(held)  # before the registry, so whoever resolves it finds it
            self._remember(manifest)
            if not slab.published and self.reaches(slab.device):
                self._expose_if_room(slab)
            await self._registry.commit(manifest, self.replica(held))
            held.advertised = True
        except BaseException:
            if held is not None:
                self.versions.unlist(held)
            self._free(slab)
            if version:
                with contextlib.suppress(TensordError):  # recorded but never committed: lost at restart
                    await self.versions.forget(m.name, version)
            raise
        log.info("committed %s v%d: %d tensors, %d bytes on %s", m.name, version, len(m), m.nbytes, slab.device)
        try:
            await self._retain(m.name)
        except TensordError as exc:  # the version stands; retention runs again at the next commit
            log.warning("retention for %s skipped: %s", m.name, exc.message)
        return held

    def abort(self, rid: int) -> None:
        r = self._reservations.pop(rid, None)
        if r is not None:
            self._free(r.slab)
            log.debug("aborted reservation #%d for %s", rid, r.name)

    def replica(self, held: Held) -> Replica:
        m, slab = held.manifest, held.slab
        address, transport = self._engine.address(slab), self._engine.transport
        session = transport.session if transport is not None and address is not None else ""
        return Replica(
            m.name,
            m.version,
            self.node,
            slab.device,
            transport=session,
            address=address or 0,
            nbytes=slab.nbytes,
            generation=slab.generation,
        )

    def discard(self, slab: Slab) -> None:
        """Free a slab that never became a version (a failed pull)."""
        self._free(slab)

    async def adopt(self, manifest: Manifest, slab: Slab, *, source: str = "peer") -> Held:
        """Hold a copy of a committed version that came from another node (or, `source` its
        origin, was read again from its checkpoint), and advertise it."""
        self._engine.hide(slab)
        slab.seal()
        held = await self.versions.settled((manifest.name, manifest.version))  # an eviction withdraws it first
        if held is not None:
            self._free(slab)
            return held
        held = Held(manifest, slab)
        evicted = self.versions.add(held)  # held again (not evictable until advertised)
        self._remember(manifest)
        try:
            await self.versions.record(manifest, slab.device, source)
            if self.reaches(slab.device):
                self._expose_if_room(slab)
            await self._registry.add_replica(self.replica(held))
            held.advertised = True
        except BaseException as exc:
            self.versions.drop(held)
            if isinstance(exc, NotFound):  # deleted meanwhile: nothing left to hold
                await self.forget(*held.key)
            elif evicted is not None:
                self.versions.note_evicted(*evicted)
            raise
        if source == "peer":
            self._metrics.moved("transfer_engine", "write", manifest.data_bytes)
        log.info("holding a replica of %s v%d on %s (from %s)", manifest.name, manifest.version, slab.device, source)
        return held

    # -- reading ----------------------------------------------------------------------------
    async def resolve(self, name: str, version: int | None) -> Held:
        """The locally held version `version` names; NotFound if this node does not hold it."""
        held = self.versions.holds(name, await self.resolve_version(name, version))
        if held is None:
            raise NotFound(f"{name} v{version or 'latest'} is not held on node {self.node}", name=name, version=version)
        return held

    async def resolve_version(self, name: str, version: int | None) -> int:
        """Ask the registry; while it is unreachable, answer from what this node holds."""
        try:
            return await self._registry.resolve(name, version)
        except Unavailable:
            local = [h.manifest.version for h in self.versions.live(name)]
            if version is not None and version in local:
                return version
            if version is None and local:
                return max(local)
            raise

    # -- removal ----------------------------------------------------------------------------
    async def delete(self, name: str, version: int | None) -> int:
        versions = [version] if version is not None else await self._registry.versions(name)
        deleted = 0
        for v in versions:
            await self.forget(name, v)  # first: a delete whose record stays would come back at restart
            deleted += await self._registry.delete_version(name, v)
            if (held := self.versions.lookup(name, v)) is not None:
                self.retire(held)
        return deleted

    async def _retain(self, name: str) -> None:
        """Keep the newest `retention` versions of `name` (0: keep all)."""
        if not self.retention:
            return
        versions = await self._registry.versions(name)
        for v in versions[: -self.retention]:
            await self.forget(name, v)  # first, as a delete
            await self._registry.delete_version(name, v)
            if (held := self.versions.holds(name, v)) is not None:
                log.info("retention: retiring %s v%d (%d pins)", name, v, held.pins)
                self.retire(held)

    def _free(self, slab: Slab) -> None:
        self._engine.hide(slab)
        slab.free()
        if not slab.published:
            self._budgets.give(slab.device, slab.nbytes)
            self._fit_idle(slab.device)

    def _fit_idle(self, device: str) -> None:
        """Keep the GPU blocks held idle for reuse within the device's unused budget."""
        if device.startswith("cuda"):
            self._blocks.shrink(device, self._budgets.limit[device] - self._budgets.used[device])

    async def reconcile(self) -> None:
        """Retire held versions whose manifest left the registry (deleted by another node)."""
        for held in [h for h in self.versions.live() if h.advertised]:
            name, version = held.key
            if version not in await self._registry.versions(name) and held.live:  # not retired meanwhile
                log.info("%s v%d was deleted elsewhere: retiring the local replica", name, version)
                self.retire(held)
                await self.forget(name, version)

    def close(self) -> None:
        """Free everything (shutdown): reservations, then held slabs, pinned or not."""
        for rid in list(self._reservations):
            self.abort(rid)
        for held in self.versions.all():
            self.versions.drop(held)
