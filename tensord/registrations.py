"""Slabs this node's Transfer Engine exposes to other nodes.

GPU slabs of one block share the block's registration (the engine registers whole CUDA
allocations), so each registered range counts its users and goes when the last one is hidden.
One engine advertises at most `advertised_ranges()` ranges: past that, every reader's handshake
with it would fail (Mooncake's 1 MiB message), so further slabs stay unexposed (readable on
this node only) until ranges go.
"""

from __future__ import annotations

from tensord.memory import Slab
from tensord_contract.descriptors import RemoteReplica
from tensord_contract.errors import Unavailable
from tensord_dataplane.cuda import current
from tensord_dataplane.transport.base import Transport, advertised_ranges


class Registrations:
    def __init__(self, node: str, transport: Transport | None = None) -> None:
        self.node = node
        self._transport = transport
        self._registered: dict[int, tuple[Slab, int]] = {}  # id(slab) -> (slab, address)
        self._ranges: dict[int, list[int]] = {}  # registered base -> [length, users]
        self.limit = advertised_ranges()

    @property
    def transport(self) -> Transport | None:
        return self._transport

    def attach(self, transport: Transport | None) -> None:
        """Use `transport` from now on: once, before any slab is exposed."""
        if self._transport is not None or self._registered:
            raise RuntimeError("a store's transport is attached once, before any slab is exposed")
        self._transport = transport

    def reaches(self, device: str) -> bool:
        """Whether the engine can expose slabs on `device`."""
        return self._transport is not None and self._transport.supports(device)

    def expose(self, slab: Slab, *, writable: bool) -> int:
        """Register the slab with the Transfer Engine (read-only once committed); its address."""
        if self._transport is None or not self._transport.supports(slab.device):
            raise Unavailable(f"node {self.node} has no Transfer Engine for {slab.device} memory")
        self.hide(slab)
        address = slab.address(writable=writable)
        base, length = slab.registration(address)
        if base not in self._ranges and len(self._ranges) >= self.limit:
            raise Unavailable(
                f"node {self.node}'s Transfer Engine advertises {self.limit} ranges already, the most one "
                "engine can hand a reader (TENSORD_ENGINE_BUFFERS): this slab is not exposed to other nodes",
                limit=self.limit,
            )
        users = self._ranges.setdefault(base, [length, 0])
        if users[1] == 0:
            with current(slab.device):
                self._transport.register(base, length)
        users[1] += 1
        self._registered[id(slab)] = (slab, address)
        return address

    def hide(self, slab: Slab) -> None:
        """Unregister the slab (if exposed) and drop the daemon's own mapping of it."""
        entry = self._registered.pop(id(slab), None)
        if entry is not None and self._transport is not None:
            base, _ = slab.registration(entry[1])
            users = self._ranges[base]
            users[1] -= 1
            if users[1] == 0:
                del self._ranges[base]
                with current(slab.device):
                    self._transport.unregister(base)
        slab.unmap()

    def remote(self, slab: Slab) -> RemoteReplica:
        """How another node reaches `slab`; Unavailable if the engine does not expose it."""
        if slab.published:
            slab.address(writable=False)  # raises: a publisher's memory is read on its node only
        address = self.address(slab)
        if self._transport is None:
            raise Unavailable(
                f"node {self.node} has no Transfer Engine: its sets are readable over its Unix socket only"
            )
        if address is None:
            raise Unavailable(
                f"node {self.node} does not expose this slab to other nodes (its engine advertises "
                f"{len(self._ranges)} ranges; at most {self.limit}): read it on that node"
            )
        return RemoteReplica(self.node, slab.device, self._transport.session, address, slab.nbytes, slab.generation)

    def address(self, slab: Slab) -> int | None:
        """Where the engine exposes `slab`; None if it does not."""
        entry = self._registered.get(id(slab))
        return entry[1] if entry is not None else None
