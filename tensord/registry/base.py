"""The registry interface: who holds which version of which set.

Two implementations: ``local`` (embedded, in memory, one node, the default) and ``etcd``
(cluster). The daemon is the only writer. Every method may raise ``Unavailable`` when the
backing store cannot be reached, and ``NotFound`` for a name or version that does not exist.

Versions are allocated per name, strictly increasing and never reused. ``latest`` is the newest
committed version that still exists; it only moves forward on commit.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tensord_contract.manifest import Manifest


@dataclass(frozen=True)
class NodeRecord:
    """What a node advertises while it lives."""

    node: str
    host: str = ""
    control: str = ""  # "unix:/path" or "tcp:host:port"
    transport: str = ""  # Transfer Engine session id, "" when none
    devices: dict[str, int] = field(default_factory=dict)  # device -> budget in bytes

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> NodeRecord:
        return cls(**{k: data[k] for k in ("node", "host", "control", "transport", "devices")})


@dataclass(frozen=True)
class Replica:
    """One slab holding one version on one device of one node."""

    name: str
    version: int
    node: str
    device: str
    transport: str = ""  # Transfer Engine session of the holding node
    address: int = 0  # slab base address registered with the Transfer Engine
    nbytes: int = 0
    generation: int = 0  # changes whenever the slab is re-allocated

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Replica:
        return cls(**data)


@dataclass(frozen=True)
class PartialReplica:
    """A replica still being filled by a streaming pull (`tensord.fleet`): which chunks of
    `chunk` bytes it holds (`have`, a bitmap of `count` bits, `tensord_contract.streams.pack_bitmap`).
    Kept apart from replicas: nothing that reads sets ever takes it for one."""

    name: str
    version: int
    node: str
    device: str
    chunk: int
    count: int
    have: bytes = b""

    @property
    def held(self) -> int:
        return int.from_bytes(self.have, "big").bit_count() if self.have else 0

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> PartialReplica:
        return cls(**{k: data[k] for k in ("name", "version", "node", "device", "chunk", "count", "have")})


class Registry(abc.ABC):
    """The cluster-wide catalogue. Implementations must be safe for concurrent use by tasks."""

    @abc.abstractmethod
    async def start(self, node: NodeRecord) -> None:
        """Connect and advertise `node` (under a lease, where the backend has leases)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Withdraw this node and everything it advertised; idempotent."""

    @abc.abstractmethod
    async def allocate_version(self, name: str) -> int:
        """Reserve the next version number of `name`; two callers never get the same one."""

    @abc.abstractmethod
    async def commit(self, manifest: Manifest, replica: Replica) -> None:
        """Publish `manifest` and its first replica, then move latest forward to it if newer."""

    @abc.abstractmethod
    async def resolve(self, name: str, version: int | None = None) -> int:
        """The version that `version` names (None: latest). NotFound if it does not exist."""

    @abc.abstractmethod
    async def manifest(self, name: str, version: int) -> Manifest:
        """The manifest of one committed version. NotFound if it does not exist."""

    @abc.abstractmethod
    async def versions(self, name: str) -> list[int]:
        """Committed versions of `name` that still exist, ascending; [] for an unknown name."""

    @abc.abstractmethod
    async def names(self, prefix: str = "") -> list[str]:
        """Names with at least one existing version whose name starts with `prefix`, sorted."""

    @abc.abstractmethod
    async def delete_version(self, name: str, version: int) -> bool:
        """Remove a version's manifest and replica keys; False if it did not exist."""

    @abc.abstractmethod
    async def add_replica(self, replica: Replica) -> None:
        """Advertise another replica of an existing version (held under this node's lease)."""

    @abc.abstractmethod
    async def remove_replica(self, name: str, version: int, node: str, device: str) -> None:
        """Withdraw one replica; idempotent."""

    @abc.abstractmethod
    async def replicas(self, name: str, version: int) -> list[Replica]:
        """Live replicas of one version (those of dead nodes are gone)."""

    @abc.abstractmethod
    async def nodes(self) -> list[NodeRecord]:
        """Live nodes."""

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """Where this registry stands, for the daemon's `status`: at least ``kind``; a backend
        with leases adds ``lease`` ("held", "failing", "lost" or "none") and its details."""

    # Partial replicas: only a cluster has them (a node with no peers never streams a pull).
    async def put_partial(self, partial: PartialReplica) -> None:
        """Advertise (or update) this node's partial replica of a version, under its lease."""
        del partial  # a registry without peers has no use for it

    async def remove_partial(self, name: str, version: int, node: str, device: str) -> None:
        """Withdraw a partial replica; idempotent."""
        del name, version, node, device

    async def partials(self, name: str, version: int) -> list[PartialReplica]:
        """Partial replicas of one version (those of dead nodes are gone)."""
        return []

    @abc.abstractmethod
    def watch(self, name: str, *, after: int = 0) -> AsyncIterator[int]:
        """Yield each version of `name` committed after `after`, in increasing order, forever.

        Versions committed while nobody iterates are still delivered (the iterator resumes
        from where it stood); a version deleted before delivery may be skipped.
        """
