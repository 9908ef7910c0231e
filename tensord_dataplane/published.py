"""A publishing process's memory read one-sided through its own Transfer Engine: both ends.

The publisher registers the allocations its tensors lie in (`Registered`: GPU allocations
whole, host tensors' own byte ranges) with its engine and keeps them registered until its
publication is withdrawn (GPU allocations longer, for the next publication of the same
memory: `SeedRanges`), as SGLang R-Fork's seed does; the daemon advertises the version and
hands readers a `published` descriptor (the engine's session and each allocation's address).
A reader (`PublishedAccess`, on any node, this one included) reads the pieces of the manifest's
packed layout straight from those addresses, as `RemoteAccess` reads a daemon's slab. Nothing is
copied on the publisher's side and its GPU runs no kernel for a read.

A publisher may vanish mid-read (SIGKILL): its engine's sockets close and the read fails with
TransferError; readers check fingerprints of what they read from a publication by default.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tensord_contract.descriptors import PublishedReplica
from tensord_contract.errors import InvalidArgument, TransferError
from tensord_contract.manifest import Manifest
from tensord_dataplane.cuda import buffer_ids, current
from tensord_dataplane.remote import DIRECT, RemoteAccess, allocations, read_through_stages, window_for
from tensord_dataplane.sources import Places, Sources
from tensord_dataplane.spans import Spans, Window
from tensord_dataplane.transport.base import Batch, Transport, advertised_ranges

log = logging.getLogger(__name__)

#: ranges one engine advertises (TENSORD_ENGINE_BUFFERS): see `SeedRanges`
BUFFERS_PER_ENGINE = advertised_ranges()


class SeedRanges:
    """The ranges one publishing process has registered with its engines, and how many live
    publications use each. A GPU allocation no publication uses any more stays registered
    (idle), so that publishing the same memory again (an RL engine after each update) registers
    nothing; it is registered again if the driver says the allocation was freed and made anew
    meanwhile (its buffer id changed), and goes at the next publication that does not use it, or
    at close. Host ranges go at once: freed host memory may be unmapped.

    One engine advertises at most `per_engine` ranges: a reader fetches an engine's list of
    registered buffers in one handshake message, which Mooncake caps at 1 MiB (about 4,000
    GPU allocations, 17,000 host ranges over TCP); registering also slows with the square of
    the list. More ranges go to more engines, started by `more` (in parallel, once)."""

    def __init__(
        self, transport: Transport, more: Callable[[], Transport] | None = None, per_engine: int | None = None
    ) -> None:
        self.engines = [transport]
        self._more = more
        self.per_engine = per_engine or BUFFERS_PER_ENGINE
        self._lock = threading.Lock()
        self._uses: dict[tuple[int, int], int] = {}  # (base, size) -> live publications over it
        self._idle: dict[tuple[int, int], str] = {}  # (base, size) -> device, registered, unused
        self._ids: dict[tuple[int, int], int] = {}  # GPU ranges: the allocation's buffer id
        self._engine: dict[tuple[int, int], int] = {}  # registered range -> index of its engine
        self._held = [0]  # ranges registered per engine

    @property
    def transport(self) -> Transport:
        """The first engine (the one every publisher has)."""
        return self.engines[0]

    def sessions(self, ranges: Sequence[tuple[int, int]]) -> tuple[tuple[str, ...], bytes]:
        """Every engine's session, and per range the index of the one it is registered with
        (empty while one engine holds everything)."""
        with self._lock:
            sessions = tuple(e.session for e in self.engines)
            if len(sessions) == 1:
                return sessions, b""
            return sessions, np.array([self._engine[r] for r in ranges], dtype="<u2").tobytes()

    def close(self) -> None:
        """Close every engine (the publications are gone with the daemon's connection)."""
        for engine in self.engines:
            engine.close()

    def take(self, p: Places, ids: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Register what `p` needs that is not registered (TransferError, InvalidArgument for a
        range overlapping another publication's); the ranges, to `give` back. `ids`: the
        allocations' buffer ids, where the caller has just asked for them."""
        ranges = list(zip(p.bases.tolist(), p.sizes.tolist(), strict=True))
        if not p.device.startswith("cuda"):
            ids = []
        elif not ids:
            ids = buffer_ids([b for b, _ in ranges], p.device)
        with self._lock:
            wanted = set(ranges)
            self._drop([(r, d) for r, d in self._idle.items() if r not in wanted])
            if ids:  # re-made allocations at the same place: their registration is stale
                stale = [r for r, i in zip(ranges, ids, strict=True) if r in self._idle and self._ids.get(r) != i]
                self._drop([(r, p.device) for r in stale])
            fresh = [r for r in ranges if r not in self._uses and r not in self._idle]
            done: list[tuple[tuple[int, int], str]] = []
            try:
                with current(p.device):
                    for (base, size), e in zip(fresh, self._places_for(len(fresh)), strict=True):
                        self.engines[e].register(base, size)
                        self._engine[(base, size)] = e
                        self._held[e] += 1
                        done.append(((base, size), p.device))
            except BaseException:
                self._drop(done)
                raise
            for r, i in zip(ranges, ids or [0] * len(ranges), strict=True):
                self._uses[r] = self._uses.get(r, 0) + 1
                self._idle.pop(r, None)
                if ids:
                    self._ids[r] = i
        return ranges

    def _places_for(self, n: int) -> list[int]:
        """The engine each of `n` new ranges goes to: the first ones with room, then new ones."""
        room = [max(0, self.per_engine - held) for held in self._held]
        short = n - sum(room)
        if short > 0:
            if self._more is None:
                raise TransferError(
                    f"this process's Transfer Engine advertises at most {self.per_engine} allocations; "
                    f"{short} more are needed"
                )
            added = -(-short // self.per_engine)
            with ThreadPoolExecutor(added) as pool:  # each start waits for its listener
                starts = [pool.submit(self._more) for _ in range(added)]
            failed = [f.exception() for f in starts if f.exception() is not None]
            if failed:
                for f in starts:
                    if f.exception() is None:
                        f.result().close()
                raise failed[0]  # type: ignore[misc]
            self.engines += [f.result() for f in starts]
            self._held += [0] * added
            room += [self.per_engine] * added
        out: list[int] = []
        for e, free in enumerate(room):
            out += [e] * min(free, n - len(out))
        return out

    def give(self, ranges: list[tuple[int, int]], device: str) -> None:
        """A publication over `ranges` was withdrawn: keep GPU ranges registered, idle."""
        with self._lock:
            gone = []
            for r in ranges:
                left = self._uses.get(r, 1) - 1
                if left > 0:
                    self._uses[r] = left
                    continue
                self._uses.pop(r, None)
                if device.startswith("cuda"):
                    self._idle[r] = device
                else:
                    gone.append((r, device))
            self._drop(gone)

    def _drop(self, ranges: list[tuple[tuple[int, int], str]]) -> None:
        """Unregister (logged, not raised: the memory stays its owner's)."""
        for (base, size), device in ranges:
            self._idle.pop((base, size), None)
            self._ids.pop((base, size), None)
            e = self._engine.pop((base, size), None)
            if e is None:
                continue
            self._held[e] -= 1
            try:
                with current(device):
                    self.engines[e].unregister(base)
            except TransferError as exc:
                log.warning("%s", exc.message)


class Registered:
    """One publication's allocations, registered with its publisher's engine until `close()`."""

    def __init__(self, seeds: SeedRanges, p: Places, ids: Sequence[int] | None = None) -> None:
        if not seeds.transport.supports(p.device):
            raise TransferError(f"this process's Transfer Engine cannot expose {p.device} memory")
        self._seeds, self.device = seeds, p.device
        self._ranges: list[tuple[int, int]] | None = seeds.take(p, ids)
        sessions, session_of = seeds.sessions(self._ranges)
        # node, size and generation are the daemon's to set
        self.replica = PublishedReplica(
            "",
            p.device,
            sessions[0],
            tuple(p.bases.tolist()),
            tuple(p.sizes.tolist()),
            p.block.tobytes(),
            p.offset.tobytes(),
            0,
            0,
            "published",
            sessions[1:],
            session_of,
        )

    def close(self) -> None:
        """The publication is withdrawn: its ranges are no longer its. Idempotent."""
        ranges, self._ranges = self._ranges, None
        if ranges is not None:
            self._seeds.give(ranges, self.device)


class PublishedAccess(RemoteAccess):
    """A publication read through its publisher's Transfer Engine; read-only."""

    #: the publisher may withdraw it (or die) during a read: releases wait to learn whether it did
    revocable = True
    verify_by_default = True

    def __init__(self, replica: PublishedReplica, manifest: Manifest, transport: Transport) -> None:
        self.node, self.session, self.address = replica.node, replica.session, 0
        self.nbytes, self.generation, self.device = replica.nbytes, replica.generation, replica.device
        self._transport = transport
        block, offset = replica.layout(manifest.sizes)
        bases = np.array(replica.addresses or [0], dtype=np.int64)
        used = manifest.sizes > 0
        self._sources = Sources(manifest, np.where(used, bases[np.where(used, block, 0)] + offset, 0))
        self._sessions, engine_of = replica.sessions()
        order = np.argsort(bases, kind="stable")  # a piece's allocation: by its source address
        self._starts = bases[order]
        self._engine = None if engine_of is None else engine_of.astype(np.int64)[order]

    def base(self) -> torch.Tensor:
        raise InvalidArgument(
            "this set lies in the memory of the process that published it: mount needs a replica "
            "held by a daemon (use get or load_into)"
        )

    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        raise InvalidArgument("a published replica is read-only")

    def read_runs(self, dst: torch.Tensor, src: np.ndarray, at: np.ndarray, lengths: np.ndarray) -> None:
        self._read(dst.data_ptr() + at, src, lengths, dst.device)

    def read_into(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        self._read(ptrs, offsets, sizes, device)

    def read_registered(self, local: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: str) -> None:
        """Read layout ranges to local addresses already registered with the engine (a daemon
        filling a slab it exposes: replicating a publication)."""
        self._read(local, offsets, sizes, torch.device(device), registered=True)

    def batches(self, dst: np.ndarray, src: np.ndarray, n: np.ndarray) -> list[tuple[str, Batch]]:
        """Pieces at the publisher's addresses `src` as engine batches: one per engine they lie
        in, never merging pieces of two allocations (each is registered on its own)."""
        block = np.searchsorted(self._starts, src, "right") - 1
        if self._engine is None:
            return [(self.session, Batch(dst, src, n, block))]
        of = self._engine[block]
        return [
            (self._sessions[e], Batch(dst[of == e], src[of == e], n[of == e], block[of == e]))
            for e in np.unique(of).tolist()
        ]

    def _read(
        self, local: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device, registered: bool = False
    ) -> None:
        """Layout ranges (`offsets`, `sizes`) to local addresses: large pieces one engine entry
        each, straight to their place (registered for the call unless `registered`); many
        small ones in spans through a staging buffer (`Spans`), scattered by the batched copy."""
        offsets, sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
        if len(offsets) and (int(offsets.min()) < 0 or int((offsets + sizes).max()) > self.nbytes):
            raise InvalidArgument(f"a read reaches past the {self.nbytes}-byte publication on node {self.node}")
        k, rel, src, n = self._sources.pieces(offsets, sizes)
        dst = np.asarray(local, dtype=np.int64)[k] + rel
        gap = self._transport.entry_bytes if len(n) > DIRECT else 0
        block = np.searchsorted(self._starts, src, "right") - 1
        spans = Spans.of(src, n, block, gap, window_for(int(n.sum())))
        d = spans.direct
        if len(d):
            ranges = [] if registered else allocations(dst[d], n[d], device)
            self._direct(ranges, dst[d], src[d], n[d])
        if spans.windows:
            self._staged(spans, dst, device)

    def _direct(self, ranges: list[tuple[int, int, str]], dst: np.ndarray, src: np.ndarray, n: np.ndarray) -> None:
        """One engine batch (per publisher's engine); `ranges` registered for its duration."""
        registered: list[tuple[int, str]] = []
        try:
            for address, length, where in ranges:
                with current(where):
                    self._transport.register(address, length)
                registered.append((address, where))
            for session, batch in self.batches(dst, src, n):
                self._transport.read(session, batch)
        finally:
            for address, where in registered:
                try:
                    with current(where):
                        self._transport.unregister(address)
                except TransferError as exc:
                    log.warning("%s", exc.message)

    def _staged(self, spans: Spans, dst: np.ndarray, device: torch.device) -> None:
        """Each window of spans read into one half of the kept staging buffer, then scattered."""

        def fill(at: int, w: Window) -> None:
            for session, batch in self.batches(at + w.at, w.remote, w.length):
                self._transport.read(session, batch)

        read_through_stages(
            self._transport, device, spans.size, spans.windows, fill, lambda w: (dst[w.pieces], w.rel, w.n)
        )
