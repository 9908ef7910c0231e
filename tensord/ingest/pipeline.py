"""One load pipeline for both sides: read a checkpoint, plan its sets, reserve, ingest, commit.

The daemon (``tensord load --on-daemon``: the daemon reads the files) and a client process
(``tensord load``: the command reads them into slabs the daemon reserved for it) run this same
code; what differs is only where reservations come from, a ``Sink``: ``store_sink.StoreSink``
over the daemon's Store, ``tensord.cli.checkpoints.ClientSink`` over an ``sdk.Client``.
Everything is validated (headers, shard plans, every file opens and is long enough) before the
first reservation; a set appears only when every byte is written, and with ``tp`` ranks only
once every rank is written (all ranks are filled in one pass over the files); what is not
committed is aborted.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tensord.checkpoint import read_checkpoint, read_passed_checkpoint
from tensord.ingest.engine import Ingested, check_threads, ingest_ranks
from tensord.ingest.reads import Source, opened
from tensord.sharding import ShardRules, plan_ranks
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest, Table
from tensord_contract.names import check_name
from tensord_dataplane.slab import SlabAccess


class Reserved(Protocol):
    """A slab reserved for one set, laid out by ``manifest``; ``commit`` makes it a version."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def slab(self) -> SlabAccess: ...

    def commit(self, fingerprints: Sequence[int]) -> int:
        """Publish the written slab with these fingerprints (manifest order); its version."""
        ...


class Sink(Protocol):
    """Where loaded sets go. ``reserve`` is a context manager: leaving it uncommitted aborts."""

    def reserve(self, name: str, table: Table, *, device: str, origin: str) -> AbstractContextManager[Reserved]: ...


@dataclass(frozen=True)
class Loaded:
    """What a load made: ``(set name, version)`` for each set (one per tp rank), the bytes
    written into them (``nbytes``: a replicated tensor counts once per rank) and the bytes read
    from the files (``read``: each once, a replicated tensor too)."""

    sets: list[tuple[str, int]]
    nbytes: int
    read: int


def default_threads(device: str) -> int:
    """Reader threads for a load: 16 for GPUs, whose copies outrun a few readers (measured:
    16 threads reach 3.4x load_file(cuda) on an H200 host, 8 threads 2.4x); for host slabs,
    which the readers fill themselves, one per core up to 8 (on a 2-core VM, 2 threads loaded
    faster than 4 or 8, cold and warm)."""
    return 16 if device.startswith("cuda") else max(2, min(8, os.cpu_count() or 2))


def load(
    sink: Sink,
    path: str | Path,
    name: str,
    *,
    device: str = "cpu",
    tp: int | None = None,
    rules: ShardRules | None = None,
    root: str | None = None,
    threads: int | None = None,
    progress: bool = False,
    logger: logging.Logger | None = None,
    label: str | None = None,
    passed: Sequence[tuple[str, int]] | None = None,
    unchanged: Callable[[], None] | None = None,
    track: Callable[[Progress], None] | None = None,
) -> Loaded:
    """Load a .safetensors file or a Hugging Face directory as the next version of `name`, or,
    with `tp`, split for tensor parallelism by `rules` into sets ``name/tp0`` … ``name/tp{tp-1}``.

    `root`: the directory shard files must resolve inside (see ``read_checkpoint``). `progress`
    draws a bar on stderr; `logger` gets progress lines, labelled `label` (default: `name`).
    `passed`: the checkpoint's files as the caller opened them, (label, descriptor): read from
    those, never by path (`path` is then only the origin). `unchanged` is called when every
    byte is written, before any commit; it raises if the files changed meanwhile. `track` is
    handed the load's ``Progress`` before the first byte is read.
    """
    started = time.perf_counter()
    check_name(name)
    threads = check_threads(default_threads(device) if threads is None else threads)
    if tp is not None:
        if not is_int(tp, 1):
            raise InvalidArgument(f"tp must be a positive int, not {tp!r:.40}")
        if not isinstance(rules, ShardRules):
            raise InvalidArgument("rules must be ShardRules (see tensord.sharding.load_rules)")
        names = [check_name(f"{name}/tp{rank}") for rank in range(tp)]
    tensors = read_checkpoint(path, root=root) if passed is None else read_passed_checkpoint(passed)
    files = None if passed is None else dict(passed)
    origin = f"file:{os.path.abspath(path)}"
    sets: list[tuple[str, Sequence[Source], str]]
    if tp is None:
        sets = [(name, tensors, origin)]
    else:
        assert rules is not None
        plans = plan_ranks(tensors, tp, rules)
        sets = [(names[r], plans[r], f"{origin}#rank={r}&tp={tp}") for r in range(tp)]
    with opened(tensors, files):  # every file opens and is long enough, before reserving
        pass
    total = sum(s.nbytes for _, sources, _ in sets for s in sources)
    bar = Progress(total, progress, logger=logger, label=label or name)
    if track is not None:
        track(bar)
    marks = [("headers", time.perf_counter())]  # each phase ends at its mark
    with ExitStack() as stack:  # aborts every reservation not committed, on any error
        reserved = [
            stack.enter_context(sink.reserve(n, _table(sources), device=device, origin=o)) for n, sources, o in sets
        ]
        marks.append(("reserve", time.perf_counter()))
        ingested = _fill(reserved, [sources for _, sources, _ in sets], threads, bar, files)
        marks.append(("ingest", time.perf_counter()))
        if unchanged is not None:
            unchanged()
        versions = [r.commit(fps) for r, fps in zip(reserved, ingested.fingerprints, strict=True)]
        marks.append(("commit", time.perf_counter()))
    if logger is not None:
        starts = [started] + [t for _, t in marks]
        logger.info(
            "%s: %s", label or name, ", ".join(f"{k} {t - a:.3f} s" for (k, t), a in zip(marks, starts, strict=False))
        )
    return Loaded([(n, v) for (n, _, _), v in zip(sets, versions, strict=True)], total, ingested.read)


def _table(sources: Sequence[Source]) -> Table:
    return Table.build([s.name for s in sources], [s.dtype for s in sources], [s.shape for s in sources])


def _fill(
    reserved: list[Reserved],
    sources: list[Sequence[Source]],
    threads: int,
    bar: Progress,
    files: dict[str, int] | None,
) -> Ingested:
    """Ingest into the reservations (a rank's each), in one pass over the files, each in the
    order of its layout."""
    ordered = []
    for r, wanted in zip(reserved, sources, strict=True):
        manifest = r.manifest
        by_name = {s.name: s for s in wanted}
        mine = [by_name.get(t.name) for t in manifest.tensors]
        if None in mine or len(by_name) != len(mine):
            raise InvalidArgument(f"the daemon's layout of {manifest.name} does not list the tensors asked for")
        ordered.append(mine)
    slabs, manifests = [r.slab for r in reserved], [r.manifest for r in reserved]
    return ingest_ranks(slabs, manifests, ordered, threads=threads, progress=bar.advance, passed=files)  # type: ignore[arg-type]


class Progress:
    """Bytes, GB/s and ETA: a one-line bar on stderr, and/or log lines (for the daemon's log).

    ``advance`` is the callable ``ingest_ranks`` takes; it is safe to call from several threads.
    """

    def __init__(
        self,
        total: int,
        enabled: bool,
        *,
        logger: logging.Logger | None = None,
        label: str = "ingest",
        log_every: float = 5.0,
    ) -> None:
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.logger, self.label, self.log_every = logger, label, log_every
        self.start = self._last = self._logged = time.perf_counter()
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.perf_counter()
            finished = self.done >= self.total
            if self.enabled and (now - self._last > 0.2 or finished):
                self._last = now
                self._bar(now, finished)
            if self.logger is not None and (now - self._logged > self.log_every or finished):
                self._logged = now
                done_gb, total_gb, rate, eta = self._figures(now)
                self.logger.info("%s: %.2f/%.2f GB, %.2f GB/s, ETA %.1f s", self.label, done_gb, total_gb, rate, eta)

    def _figures(self, now: float) -> tuple[float, float, float, float]:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0.0
        return self.done / 1e9, self.total / 1e9, rate / 1e9, eta

    def _bar(self, now: float, finished: bool) -> None:
        done_gb, total_gb, rate, eta = self._figures(now)
        bar = "#" * int(30 * min(self.done, self.total) / self.total)
        sys.stderr.write(f"\r[{bar:<30}] {done_gb:7.2f}/{total_gb:.2f} GB {rate:6.2f} GB/s ETA {eta:5.1f} s")
        if finished:
            sys.stderr.write("\n")
