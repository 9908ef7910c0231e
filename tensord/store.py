"""The node's store: slabs it holds, reservations being written, pins, budgets, retention,
eviction, and the catalogue of what it holds in the state directory.

Names and versions live in the registry; the store keeps the memory. A version becomes
visible only at commit, after its bytes are written and its slab sealed. A retired or deleted
version is no longer resolvable, and its slab is freed when its last pin goes.

Every version held here is recorded in the state directory's catalogue (when there is one)
before it becomes visible, and forgotten when it leaves the node for good (deleted, retired,
or evicted while another node holds it), so a restarted daemon knows what to restore.

One lifecycle per version: held (pinnable while live) → retired, deleted or evicted (no new
pins) → freed once, when its last pin goes. Eviction (`memory.eviction = "lru"`,
`tensord.eviction`) claims what it frees before it awaits anything."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensord import accounting
from tensord.eviction import plan_room, recoverable
from tensord.memory import Budgets, CudaBlocks, HostSlab, Slab, allocate
from tensord.metrics import Metrics
from tensord.published_slabs import PUBLISHED, PublishedSlab, published
from tensord.records import Held, Reservation
from tensord.registrations import Registrations
from tensord.registry.base import Registry, Replica
from tensord.state import Catalogue
from tensord_contract.errors import InvalidArgument, NotFound, OutOfCapacity, TensordError, Unavailable
from tensord_contract.manifest import ALIGN, FINGERPRINT_VERSION, MAX_BYTES, Manifest, Table
from tensord_dataplane.transport.base import Transport

log = logging.getLogger(__name__)


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
        self._catalogue, self.keep_manifests = catalogue, keep_manifests
        self.eviction, self.allowed_roots = eviction, tuple(allowed_roots)
        self._metrics = metrics if metrics is not None else Metrics()
        self._held: dict[tuple[str, int], Held] = {}
        #: versions evicted here that come back from their checkpoint on their next read
        self._evicted: dict[tuple[str, int], tuple[Manifest, str]] = {}
        #: versions evicted whose replica and record are still being withdrawn (adopt waits)
        self._leaving: dict[tuple[str, int], asyncio.Event] = {}
        self._reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._blocks = CudaBlocks()  # GPU memory of freed slabs, kept for later ones

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

    def holds(self, name: str, version: int) -> Held | None:
        """The live version held here, or None."""
        held = self._held.get((name, version))
        return held if held is not None and held.live else None

    def lookup(self, name: str, version: int) -> Held | None:
        """The version held here, live or retired while still pinned, or None."""
        return self._held.get((name, version))

    def evicted(self, name: str, version: int) -> tuple[Manifest, str] | None:
        """The manifest and device of a version evicted here that comes back from its checkpoint."""
        return self._evicted.get((name, version))

    def note_evicted(self, manifest: Manifest, device: str) -> None:
        """A version evicted before a restart: it comes back on its next read, as before."""
        self._evicted[manifest.name, manifest.version] = (manifest, device)

    def status(self) -> dict[str, Any]:
        """What this node holds and uses, per device and in all (`tensord status`, metrics)."""
        live = [h for h in self._held.values() if h.live]
        return {
            "devices": accounting.devices(live, self._budgets, self._blocks.idle_bytes),
            "huge_pages": self.huge_page_bytes(),
            "sets": len({h.manifest.name for h in live}),
            "versions": len(live),
            "pins": sum(h.pins for h in self._held.values()),
            "reservations": len(self._reservations),
            "eviction": self.eviction,
            "evicted": len(self._evicted),
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
        slabs = [h.slab for h in self._held.values()] + [r.slab for r in self._reservations.values()]
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
        version = 0
        try:
            version = await self._registry.allocate_version(m.name)
            manifest = m.committed(version, fingerprints, time.time(), fp_version)
            await self._record(manifest, slab.device, PUBLISHED if slab.published else manifest.origin)
            held = Held(manifest, slab)
            self._held[held.key] = held  # before the registry, so whoever resolves it finds it
            if not slab.published and self.reaches(slab.device):
                self.expose(slab, writable=False)
            await self._registry.commit(manifest, self.replica(held))
            held.advertised = True
        except BaseException:
            self._held.pop((m.name, version), None)
            self._free(slab)
            if version and self._catalogue is not None:
                with contextlib.suppress(TensordError):  # recorded but never committed: lost at restart
                    await self._catalogue.forget(m.name, version)
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
        key = (manifest.name, manifest.version)
        while (leaving := self._leaving.get(key)) is not None:  # its eviction withdraws it first
            await leaving.wait()
        held = self._held.get(key)
        if held is not None and held.live:
            self._free(slab)
            return held
        held = Held(manifest, slab)
        self._held[key] = held
        evicted = self._evicted.pop(key, None)  # held again (not evictable until advertised)
        try:
            await self._record(manifest, slab.device, source)
            if self.reaches(slab.device):
                self.expose(slab, writable=False)
            await self._registry.add_replica(self.replica(held))
            held.advertised = True
        except BaseException as exc:
            self._drop(held)
            if isinstance(exc, NotFound):  # deleted meanwhile: nothing left to hold
                await self.forget(*key)
            elif evicted is not None:
                self._evicted[key] = evicted
            raise
        if source == "peer":
            self._metrics.moved("transfer_engine", "write", manifest.data_bytes)
        log.info("holding a replica of %s v%d on %s (from %s)", manifest.name, manifest.version, slab.device, source)
        return held

    async def _record(self, manifest: Manifest, device: str, source: str, *, evicted: bool = False) -> None:
        """Note in the state directory that this node holds (or evicted) a version."""
        if self._catalogue is not None:
            await self._catalogue.note(manifest, device, source, evicted=evicted, with_manifest=self.keep_manifests)

    # -- reading ----------------------------------------------------------------------------
    async def resolve(self, name: str, version: int | None) -> Held:
        """The locally held version `version` names; NotFound if this node does not hold it."""
        held = self._held.get((name, await self.resolve_version(name, version)))
        if held is None or not held.live:
            raise NotFound(f"{name} v{version or 'latest'} is not held on node {self.node}", name=name, version=version)
        return held

    async def resolve_version(self, name: str, version: int | None) -> int:
        """Ask the registry; while it is unreachable, answer from what this node holds."""
        try:
            return await self._registry.resolve(name, version)
        except Unavailable:
            local = [v for (n, v), h in self._held.items() if n == name and h.live]
            if version is not None and version in local:
                return version
            if version is None and local:
                return max(local)
            raise

    def pin(self, held: Held, count: int = 1) -> None:
        held.pins += count
        held.last_read = time.monotonic()

    def unpin(self, held: Held) -> None:
        held.pins -= 1
        if held.pins == 0 and held.drained is not None:
            held.drained.set()
        if held.pins == 0 and not held.live:
            self._drop(held)

    # -- removal ----------------------------------------------------------------------------
    async def delete(self, name: str, version: int | None) -> int:
        versions = [version] if version is not None else await self._registry.versions(name)
        deleted = 0
        for v in versions:
            await self.forget(name, v)  # first: a delete whose record stays would come back at restart
            deleted += await self._registry.delete_version(name, v)
            if (held := self._held.get((name, v))) is not None:
                self.retire(held)
        return deleted

    async def forget(self, name: str, version: int) -> None:
        """A version left this node for good: nothing to restore or recover. Unavailable if
        its record cannot be removed from the state directory (it stays recorded)."""
        self._evicted.pop((name, version), None)
        if self._catalogue is not None:
            await self._catalogue.forget(name, version)

    async def _retain(self, name: str) -> None:
        """Keep the newest `retention` versions of `name` (0: keep all)."""
        if not self.retention:
            return
        versions = await self._registry.versions(name)
        for v in versions[: -self.retention]:
            await self.forget(name, v)  # first, as a delete
            await self._registry.delete_version(name, v)
            if (held := self._held.get((name, v))) is not None and held.live:
                log.info("retention: retiring %s v%d (%d pins)", name, v, held.pins)
                self.retire(held)

    def retire(self, held: Held) -> None:
        if not held.live:  # retired, evicted or freed already: once only
            return
        held.live = False
        if held.pins == 0:
            self._drop(held)

    def _drop(self, held: Held) -> None:
        """Forget and free a version's slab, once: a second free would give its budget back
        twice, or close a descriptor number reused since."""
        held.live = False
        if self._held.get(held.key) is held:
            del self._held[held.key]
        if not held.freed:
            held.freed = True
            self._free(held.slab)

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
        for held in [h for h in self._held.values() if h.live and h.advertised]:
            name, version = held.key
            if version not in await self._registry.versions(name) and held.live:  # not retired meanwhile
                log.info("%s v%d was deleted elsewhere: retiring the local replica", name, version)
                self.retire(held)
                await self.forget(name, version)

    # -- eviction ---------------------------------------------------------------------------
    async def make_room(self, device: str, nbytes: int) -> None:
        """With eviction on, evict unpinned versions on `device` that can come back, least recently
        read first, until `nbytes` more fit. Evicts nothing if that would not make room."""
        device, nbytes, budgets = self._budgets.check_device(device), max(nbytes, ALIGN), self._budgets
        if self.eviction != "lru":
            return
        plan = await plan_room(
            lambda: list(self._held.values()),
            device,
            lambda: budgets.used[device] + nbytes - budgets.limit[device],
            lambda h: recoverable(h, self._registry, self.node, self.allowed_roots),
        )
        claimed = [(h, why, self._claim(h, why)) for h, why in plan]  # at once: none pinned meanwhile
        try:
            for held, reason, idle in claimed:
                await self._withdraw(held, reason, idle)
        finally:
            for held, _, _ in claimed:
                self._leaving.pop(held.key).set()

    def _claim(self, held: Held, reason: str) -> float:
        """Evict now: unresolvable, unpinnable, slab freed, marked evicted; seconds since read."""
        self._leaving[held.key] = asyncio.Event()
        self._drop(held)
        if reason == "checkpoint":
            self._evicted[held.key] = (held.manifest, held.slab.device)
        return time.monotonic() - held.last_read

    async def _withdraw(self, held: Held, reason: str, idle: float) -> None:
        """An eviction's second half: withdraw the replica, note it in the state directory."""
        (name, version), device, nbytes = held.key, held.slab.device, held.slab.nbytes
        try:
            await self._registry.remove_replica(name, version, self.node, device)
        except TensordError as exc:  # readers elsewhere find the pin refused and try another
            log.warning("evicting %s v%d: cannot withdraw its replica now: %s", name, version, exc.message)
        try:
            if reason != "checkpoint":
                await self.forget(name, version)
            elif self._evicted.get(held.key, (None,))[0] is held.manifest:  # not deleted meanwhile
                await self._record(held.manifest, device, held.manifest.origin, evicted=True)
        except TensordError as exc:  # it stays recorded as held: a restart reads it again
            log.warning("%s", exc.message)
        self._metrics.evictions.labels(device, reason).inc()
        self._metrics.evicted_bytes.labels(device).inc(nbytes)
        why = "another node holds it" if reason == "replica" else f"comes back from {held.manifest.origin}"
        log.info("evicted %s v%d (%d bytes on %s, last read %.0f s ago): %s", name, version, nbytes, device, idle, why)

    def close(self) -> None:
        """Free everything (shutdown): reservations, then held slabs, pinned or not."""
        for rid in list(self._reservations):
            self.abort(rid)
        for held in list(self._held.values()):
            self._drop(held)
