"""A publishing process's memory read one-sided through its own Transfer Engine: both ends.

The publisher registers the allocations its tensors lie in (`Registered`: GPU allocations
whole, host tensors' own byte ranges) with its engine and keeps them registered until its
publication is withdrawn, as SGLang R-Fork's seed does; the daemon advertises the version and
hands readers a `published` descriptor (the engine's session and each allocation's address).
A reader (`PublishedSlab`, on any node, this one included) reads the pieces of the manifest's
packed layout straight from those addresses, as `RemoteSlab` reads a daemon's slab. Nothing is
copied on the publisher's side and its GPU runs no kernel for a read.

A publisher may vanish mid-read (SIGKILL): its engine's sockets close and the read fails with
TransferError; readers check fingerprints of what they read from a publication by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from tensord_contract.descriptors import PublishedReplica
from tensord_contract.errors import InvalidArgument, TransferError
from tensord_contract.manifest import Manifest
from tensord_dataplane.cuda import current
from tensord_dataplane.remote import RemoteSlab
from tensord_dataplane.sources import Places, Sources
from tensord_dataplane.transport.base import Batch, Transport

log = logging.getLogger(__name__)


class Registered:
    """A publisher's allocations registered with its Transfer Engine until `close()`. `counts`
    (shared by every publication of one engine) counts the publications over each range, so
    that publishing the same memory twice registers it once and keeps it until both are gone."""

    def __init__(self, transport: Transport, p: Places, counts: dict[tuple[int, int], int]) -> None:
        self.transport, self.device, self._counts = transport, p.device, counts
        if not transport.supports(p.device):
            raise TransferError(f"this process's Transfer Engine cannot expose {p.device} memory")
        self.ranges: list[tuple[int, int]] = []
        try:
            with current(p.device):
                for base, size in zip(p.bases.tolist(), p.sizes.tolist(), strict=True):
                    if counts.get((base, size), 0) == 0:
                        transport.register(base, size)
                    counts[(base, size)] = counts.get((base, size), 0) + 1
                    self.ranges.append((base, size))
        except BaseException:
            self.close()
            raise
        self.wire = {
            "session": transport.session,
            "device": p.device,
            "addresses": p.bases.tolist(),
            "sizes": p.sizes.tolist(),
            "block": p.block.tobytes(),
            "offset": p.offset.tobytes(),
        }

    def close(self) -> None:
        """Unregister what no other publication uses (logged, not raised: the memory stays the
        caller's). Idempotent."""
        ranges, self.ranges = self.ranges, []
        with current(self.device):
            for key in ranges:
                left = self._counts.get(key, 1) - 1
                if left > 0:
                    self._counts[key] = left
                    continue
                self._counts.pop(key, None)
                try:
                    self.transport.unregister(key[0])
                except TransferError as exc:
                    log.warning("%s", exc.message)


class PublishedSlab(RemoteSlab):
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

    def base(self) -> torch.Tensor:
        raise InvalidArgument(
            "this set lies in the memory of the process that published it: mount needs a replica "
            "held by a daemon (use get or load_into)"
        )

    def write_from(self, ptrs: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, device: torch.device) -> None:
        raise InvalidArgument("a published replica is read-only")

    def read_registered(self, local: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> None:
        """Read layout ranges to local addresses already registered with the engine (a daemon
        filling a slab it exposes: replicating a publication)."""
        self._move(self._transport.read, [], local, offsets, sizes)

    def _move(
        self,
        call: Callable[[str, Batch], None],
        ranges: list[tuple[int, int, str]],
        local: np.ndarray,
        offsets: np.ndarray,
        sizes: np.ndarray,
    ) -> None:
        """One engine batch from the publisher's addresses of the layout ranges asked for."""
        if call != self._transport.read:
            raise InvalidArgument("a published replica is read-only")
        offsets, sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
        if len(offsets) and (int(offsets.min()) < 0 or int((offsets + sizes).max()) > self.nbytes):
            raise InvalidArgument(f"a read reaches past the {self.nbytes}-byte publication on node {self.node}")
        k, rel, src, n = self._sources.pieces(offsets, sizes)
        dst = np.asarray(local, dtype=np.int64)[k] + rel
        registered: list[tuple[int, str]] = []
        try:
            for address, length, where in ranges:
                with current(where):
                    self._transport.register(address, length)
                registered.append((address, where))
            call(self.session, Batch(dst, src, n))
        finally:
            for address, where in registered:
                try:
                    with current(where):
                        self._transport.unregister(address)
                except TransferError as exc:
                    log.warning("%s", exc.message)
