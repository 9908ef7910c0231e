"""Bringing back what this node held: after a restart (every version in the state directory's
catalogue) and after an eviction (one version, on its next read here).

For each version, in the background while the daemon serves, newest version of each name first:
  1. a copy from another live node that holds it (a cluster: `Cluster.replicate`);
  2. else its checkpoint read again (`file:` origin, under `ingest.allowed_roots`; one rank of a
     `tensord load --tp`: that rank's shards, each split read back from the recorded shapes),
     kept only if every tensor's fingerprint equals the manifest's: a file changed since is not
     this version;
  3. else it is lost: logged, counted, listed by `tensord status` with the reason, and a read of
     it fails saying so. It stays in the registry (a version that existed keeps its number, and
     `latest` does not go back to an older one) until it is deleted.
A version from a client's `put` has no file: it comes back only from a peer. A read of a version
not restored yet waits for it (its restore starts at once if it had not). Versions keep their
numbers: with etcd the manifests never left; with the embedded registry they are handed back
from the catalogue before the daemon serves (`LocalRegistry.restore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from tensord.checkpoint import FileTensor, read_passed_checkpoint, recorded_checkpoint, recorded_rank
from tensord.context import NodeContext
from tensord.fleet.cluster import Cluster
from tensord.ingest import default_threads, ingest_into
from tensord.ingest.reads import Source
from tensord.memory import Slab, own_view
from tensord.opened_checkpoint import opened_inside, to_the_end
from tensord.publications import withdraw_version
from tensord.published_slabs import PUBLISHED
from tensord.records import Held
from tensord.sharding import recorded_shards
from tensord.state import Record
from tensord.store import Store
from tensord_contract.errors import InvalidArgument, NotFound, OutOfCapacity, TensordError, Unavailable
from tensord_contract.manifest import DTYPE_CODES, Manifest
from tensord_dataplane.fingerprint import mismatched_rows

log = logging.getLogger(__name__)

#: How many lost versions `status` lists (all are counted and logged).
MAX_LISTED = 100
_REGISTRY_RETRY = (0.5, 30.0)  # seconds between tries while the registry is unreachable


@dataclass(eq=False)
class Job:
    name: str
    version: int
    device: str
    source: str
    manifest: Manifest | None = None
    state: str = "pending"  # pending, running, restored, lost, deleted
    how: str = ""  # peer, checkpoint
    reason: str = ""  # why it is lost
    seconds: float = 0.0
    task: asyncio.Task[Held | None] | None = field(default=None, repr=False)

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.version


class _Cancelled(Exception):
    """Raised from an ingest's progress callback to stop it (the daemon is stopping)."""


class Restorer:
    def __init__(
        self,
        store: Store,
        context: NodeContext,
        cluster: Cluster | None,
        *,
        manifests_here: bool,
        on_progress: Callable[[str], Any] | None = None,
    ) -> None:
        """`manifests_here`: records carry the manifests (embedded registry); else they are
        read from the registry. `on_progress`: called with a one-line status now and then."""
        self.store, self.context, self.cluster, self.manifests_here = store, context, cluster, manifests_here
        self.node, self.registry, self.metrics = context.node, context.registry, context.metrics
        self.on_progress = on_progress
        self.jobs: dict[tuple[str, int], Job] = {}
        self.started = self.finished = 0.0
        self.bytes = 0
        self._runner: asyncio.Task[None] | None = None
        self._background: asyncio.Task[None] | None = None
        self._evicted: list[tuple[Record, Manifest | None]] = []
        self._published: list[Record] = []
        self._withdrawals: list[asyncio.Task[None]] = []
        self._recovering: dict[tuple[str, int], asyncio.Task[Held]] = {}
        self._stop = threading.Event()

    # -- restart ------------------------------------------------------------------------------
    def plan(self, records: list[Record], where: str = "") -> list[Manifest]:
        """Plan to restore every recorded version but the evicted ones (those come back when
        read here) and the publications (withdrawn at `start`). Returns the manifests the
        records carry (the embedded registry's state). A record whose manifest is bad is
        skipped and logged, naming the state directory `where`."""
        newest: dict[str, int] = {}
        for r in records:
            newest[r.name] = max(newest.get(r.name, 0), r.version)
        manifests = []
        for r in sorted(records, key=lambda r: (r.version != newest[r.name], r.name, -r.version)):
            manifest = None
            if r.manifest is not None:
                try:
                    manifest = Manifest.from_wire(r.manifest, InvalidArgument)
                    if (manifest.name, manifest.version) != r.key:
                        raise InvalidArgument("it is another version's")
                except InvalidArgument as exc:
                    log.warning(
                        "skipped: state directory %s: the record of %s v%d holds a bad manifest (%s): "
                        "that version is not restored",
                        where,
                        r.name,
                        r.version,
                        exc.message,
                    )
                    continue
                if r.source != PUBLISHED:
                    manifests.append(manifest)
            if r.source == PUBLISHED:  # its publisher went with the old daemon
                self._published.append(r)
            elif r.evicted:
                self._evicted.append((r, manifest))
            else:
                self.jobs[r.key] = Job(r.name, r.version, r.device, r.source, manifest)
        return manifests

    def start(self) -> None:
        """Restore in the background (the daemon serves meanwhile)."""
        loop = asyncio.get_running_loop()
        self._withdrawals = [  # publications: their publishers went with the old daemon
            loop.create_task(withdraw_version(self.store, self.context, r.name, r.version, r.device))
            for r in self._published
        ]
        if self._evicted:
            self._background = loop.create_task(self._note_evicted(), name="evicted")
        if not self.jobs:
            return
        self.started = time.monotonic()
        log.info("restoring %d held versions in the background", len(self.jobs))
        self._runner = loop.create_task(self._run_all(), name="restore")

    async def _note_evicted(self) -> None:
        """Versions evicted before the restart come back on their next read, as before."""
        for record, manifest in self._evicted:
            job = Job(record.name, record.version, record.device, record.source, manifest)
            manifest = manifest if manifest is not None else await self._manifest(job)
            if manifest is not None:
                self.store.note_evicted(manifest, record.device)

    async def _run_all(self) -> None:
        for job in list(self.jobs.values()):
            with contextlib.suppress(TensordError):  # a lost one is reported by _restore
                await self._ensure(job)
            self._progress()
        self.finished = time.monotonic()
        counts = self.counts()
        log.info(
            "restore finished in %.2f s: %d restored (%d bytes), %d lost, %d deleted meanwhile",
            self.finished - self.started,
            counts["restored"],
            self.bytes,
            counts["lost"],
            counts["deleted"],
        )
        self._progress()

    def _ensure(self, job: Job) -> asyncio.Future[Held | None]:
        if job.task is None:
            job.task = asyncio.get_running_loop().create_task(self._restore(job), name=f"restore {job.name}")
        return asyncio.shield(job.task)

    async def _restore(self, job: Job) -> Held | None:
        job.state, t0 = "running", time.monotonic()
        try:
            manifest = job.manifest if job.manifest is not None else await self._manifest(job)
            if manifest is None:
                job.state = "deleted"
                return None
            job.manifest = manifest
            held = self.store.holds(job.name, job.version)
            if held is None:
                held, job.how = await self._bring_back(manifest, job.device)
            job.state, job.seconds = "restored", time.monotonic() - t0
            self.bytes += manifest.data_bytes
            log.info(
                "restored %s v%d from %s: %d bytes in %.2f s",
                job.name,
                job.version,
                job.how,
                manifest.nbytes,
                job.seconds,
            )
            return held
        except _Cancelled:
            job.state = "pending"
            raise asyncio.CancelledError from None
        except TensordError as exc:
            job.state, job.reason, job.seconds = "lost", exc.message, time.monotonic() - t0
            self.metrics.restores.labels("lost").inc()
            log.warning("lost %s v%d (%s): %s", job.name, job.version, job.source, exc.message)
            raise
        except Exception as exc:  # a bug: report the version lost, keep restoring the others
            log.exception("restoring %s v%d", job.name, job.version)
            job.state, job.reason = "lost", f"internal error: {type(exc).__name__}: {exc}"
            self.metrics.restores.labels("lost").inc()
            raise TensordError(job.reason) from exc

    async def _manifest(self, job: Job) -> Manifest | None:
        """The version's manifest from the registry (etcd); None if it was deleted meanwhile.
        Waits while the registry is unreachable."""
        pause = _REGISTRY_RETRY[0]
        while True:
            try:
                return await self.registry.manifest(job.name, job.version)
            except NotFound:
                log.info("%s v%d was deleted while this node was down: not restored", job.name, job.version)
                await self.store.forget(job.name, job.version)
                return None
            except Unavailable as exc:
                log.warning("restore of %s v%d waits for the registry: %s", job.name, job.version, exc.message)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _REGISTRY_RETRY[1])

    async def _bring_back(self, manifest: Manifest, device: str) -> tuple[Held, str]:
        """From a peer, else from its checkpoint; TensordError saying why neither worked."""
        why: list[str] = []
        if self.cluster is not None:
            try:
                held = await self.cluster.replicate(manifest.name, manifest.version, self._device(device))
                self.metrics.restores.labels("peer").inc()
                return held, "peer"
            except TensordError as exc:
                self.metrics.transfer_failures.labels("restore").inc()
                why.append(f"no peer gave it ({exc.message})")
        else:
            why.append("no cluster to copy it from")
        try:
            held = await self.from_checkpoint(manifest, device)
        except TensordError as exc:
            why.append(f"not from its checkpoint: {exc.message}")
            raise type(exc)("; ".join(why), name=manifest.name, version=manifest.version) from None
        self.metrics.restores.labels("checkpoint").inc()
        return held, "checkpoint"

    def _device(self, device: str) -> str:
        if device not in self.store.devices:
            raise InvalidArgument(f"it was held on {device}, which this node does not serve now")
        return device

    async def from_checkpoint(self, manifest: Manifest, device: str) -> Held:
        """Read a version's checkpoint again into a new slab; held only if bit-exact."""
        store = self.store
        device = self._device(device)
        real, root = recorded_checkpoint(manifest.origin, store.allowed_roots)
        rank = recorded_rank(manifest.origin)
        with contextlib.ExitStack() as held:  # read through descriptors opened once, inside the root
            passed, _ = await to_the_end(held.enter_context, opened_inside(real, root))
            tensors = await to_the_end(read_passed_checkpoint, passed)
            return await self._read_again(manifest, device, real, rank, tensors, dict(passed))

    async def _read_again(
        self,
        manifest: Manifest,
        device: str,
        real: str,
        rank: tuple[int, int] | None,
        tensors: list[FileTensor],
        descriptors: dict[str, int],
    ) -> Held:
        store = self.store
        by_name = {t.name: t for t in tensors}
        ordered = [by_name.get(n) for n in manifest.names]
        if len(by_name) != len(manifest) or None in ordered:
            raise NotFound(f"{real} no longer holds the tensors of {manifest.name} v{manifest.version}")
        files = cast(list[FileTensor], ordered)
        sources: Sequence[Source] = files
        if rank is not None:  # one rank of a `tensord load --tp`: its shards, as its layout has them
            table = manifest.table
            layout = zip(map(DTYPE_CODES.__getitem__, table.dtypes.tolist()), table.shapes, strict=True)
            sources = recorded_shards(files, layout, *rank)
        await store.make_room(device, manifest.nbytes)
        slab = store.allocate(device, manifest.nbytes, f"{manifest.name}@{manifest.version}")
        try:
            fps = await to_the_end(self._ingest, slab, manifest, sources, descriptors)  # stops at the next chunk
            bad = mismatched_rows(manifest.fingerprints, fps)
            if len(bad):
                raise NotFound(f"{real} changed since it was loaded (tensor {manifest.names[int(bad[0])]!r} differs)")
        except BaseException:
            store.discard(slab)
            raise
        self.metrics.moved("ingest", "write", manifest.data_bytes)
        return await store.adopt(manifest, slab, source=manifest.origin)

    def _ingest(self, slab: Slab, manifest: Manifest, sources: Sequence[Source], files: dict[str, int]) -> list[int]:
        """On a worker thread, which owns the daemon's mapping of the slab from start to end:
        a stopping daemon interrupts it between chunks and never unmaps it under the readers."""

        def progress(_: int) -> None:
            if self._stop.is_set():
                raise _Cancelled

        view = own_view(slab)
        try:
            threads = default_threads(slab.device)
            return ingest_into(view, manifest, sources, threads=threads, progress=progress, passed=files)
        finally:
            view.close()

    # -- reads of versions not back yet -------------------------------------------------------
    async def recover(self, name: str, version: int) -> Held | None:
        """Bring back a version this node had (not restored yet, or evicted) for a reader now;
        None if there is nothing to bring back. TensordError if it cannot come back."""
        job = self.jobs.get((name, version))
        if job is not None and job.state in ("pending", "running"):
            try:
                return await self._ensure(job)
            except (OutOfCapacity, Unavailable):
                raise
            except TensordError as exc:
                raise NotFound(self.lost_message(name, version, exc.message), name=name, version=version) from None
        evicted = self.store.evicted(name, version)
        if evicted is None:
            return None
        task = self._recovering.get((name, version))
        if task is None:
            manifest, device = evicted
            task = asyncio.get_running_loop().create_task(self._recover(manifest, device))
            self._recovering[(name, version)] = task
            task.add_done_callback(lambda _: self._recovering.pop((name, version), None))
        return await asyncio.shield(task)

    async def _recover(self, manifest: Manifest, device: str) -> Held:
        t0 = time.monotonic()
        try:
            held = await self.from_checkpoint(manifest, device)
        except TensordError as exc:
            self.metrics.restores.labels("lost").inc()
            log.warning("cannot bring back evicted %s v%d: %s", manifest.name, manifest.version, exc.message)
            message = (
                f"{manifest.name} v{manifest.version} was evicted from node {self.node} and cannot "
                f"come back: {exc.message}"
            )
            kind = type(exc) if isinstance(exc, OutOfCapacity | Unavailable) else NotFound
            raise kind(message, name=manifest.name, version=manifest.version) from None
        self.metrics.restores.labels("checkpoint").inc()
        log.info(
            "brought back evicted %s v%d from its checkpoint in %.2f s",
            manifest.name,
            manifest.version,
            time.monotonic() - t0,
        )
        return held

    def lost(self, name: str, version: int) -> str | None:
        """Why a version this node held before its restart is lost, or None."""
        job = self.jobs.get((name, version))
        return job.reason if job is not None and self._state(job) == "lost" else None

    def _state(self, job: Job) -> str:
        """A lost version held again since (`tensord replicate` by hand) counts as restored."""
        if job.state == "lost" and self.store.holds(job.name, job.version) is not None:
            return "restored"
        return job.state

    def lost_message(self, name: str, version: int, reason: str) -> str:
        return f"{name} v{version} was lost when node {self.node} restarted: {reason}"

    # -- reporting ----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("pending", "running", "restored", "lost", "deleted"), 0)
        for job in self.jobs.values():
            out[self._state(job)] += 1
        return out

    def status(self) -> dict[str, Any]:
        counts = self.counts()
        if not self.jobs:
            state = "none"
        elif self.finished:
            state = "done"
        else:
            state = "running"
        end = self.finished or time.monotonic()
        return {
            "state": state,
            "total": len(self.jobs),
            **counts,
            "bytes": self.bytes,
            "seconds": end - self.started if self.started else 0.0,
            "lost_versions": [
                {"name": j.name, "version": j.version, "source": j.source, "reason": j.reason}
                for j in self.jobs.values()
                if self._state(j) == "lost"
            ][:MAX_LISTED],
        }

    def _progress(self) -> None:
        if self.on_progress is None:
            return
        c = self.counts()
        done = c["restored"] + c["lost"] + c["deleted"]
        if self.finished:
            text = f"serving; restored {c['restored']} of {len(self.jobs)} held versions, {c['lost']} lost"
        else:
            text = f"serving; restoring held versions: {done} of {len(self.jobs)} done, {c['lost']} lost"
        self.on_progress(text)

    async def close(self) -> None:
        """Stop restoring (the daemon is stopping): ingests end at their next chunk."""
        self._stop.set()
        tasks: list[asyncio.Task[Any]] = [t for t in (self._runner, self._background) if t is not None]
        tasks += [*self._recovering.values(), *(j.task for j in self.jobs.values() if j.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
