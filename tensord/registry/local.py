"""The embedded registry: the same interface in memory, for one node without etcd.

The version counters live in the daemon's state directory when it has one (`tensord.state`),
so versions are never reused across restarts; without one they start again at 1 when the
daemon restarts. Manifests are kept there too, with the node's catalogue of held versions:
a restarted daemon hands them back with `restore` before it serves, so every version it had
exists again under its number (without a replica until its bytes are restored) and `latest`
does not go back. Replicas live in memory only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tensord.registry.base import NodeRecord, Registry, Replica
from tensord.state import VersionCounters
from tensord_contract.errors import NotFound
from tensord_contract.manifest import Manifest


@dataclass
class _Set:
    next: int = 1
    latest: int = 0
    manifests: dict[int, Manifest] = field(default_factory=dict)
    replicas: dict[int, dict[tuple[str, str], Replica]] = field(default_factory=dict)


class LocalRegistry(Registry):
    def __init__(self, counters: VersionCounters | None = None) -> None:
        self._counters = counters
        self._sets: dict[str, _Set] = {}
        self._node: NodeRecord | None = None
        self._changed = asyncio.Condition()

    async def start(self, node: NodeRecord) -> None:
        self._node = node

    async def close(self) -> None:
        self._node = None

    def status(self) -> dict[str, Any]:
        return {"kind": "embedded"}

    def restore(self, manifests: list[Manifest]) -> None:
        """Versions committed before a restart (from the state directory), without replicas."""
        for manifest in manifests:
            s = self._sets.setdefault(manifest.name, _Set())
            s.manifests[manifest.version] = manifest
            s.replicas.setdefault(manifest.version, {})
            s.latest = max(s.latest, manifest.version)
            s.next = max(s.next, manifest.version + 1)

    async def allocate_version(self, name: str) -> int:
        if self._counters is not None:
            return await self._counters.advance(name)
        s = self._sets.setdefault(name, _Set())
        s.next += 1
        return s.next - 1

    async def commit(self, manifest: Manifest, replica: Replica) -> None:
        s = self._sets.setdefault(manifest.name, _Set())
        s.manifests[manifest.version] = manifest
        s.replicas[manifest.version] = {(replica.node, replica.device): replica}
        s.latest = max(s.latest, manifest.version)
        async with self._changed:
            self._changed.notify_all()

    async def resolve(self, name: str, version: int | None = None) -> int:
        s = self._sets.get(name)
        if s is None or not s.manifests:
            raise NotFound(f"no set named {name!r}", name=name)
        if version is None:
            return s.latest if s.latest in s.manifests else max(s.manifests)
        if version not in s.manifests:
            raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
        return version

    async def manifest(self, name: str, version: int) -> Manifest:
        version = await self.resolve(name, version)
        return self._sets[name].manifests[version]

    async def versions(self, name: str) -> list[int]:
        s = self._sets.get(name)
        return sorted(s.manifests) if s else []

    async def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n, s in self._sets.items() if s.manifests and n.startswith(prefix))

    async def delete_version(self, name: str, version: int) -> bool:
        s = self._sets.get(name)
        if s is None or version not in s.manifests:
            return False
        del s.manifests[version]
        s.replicas.pop(version, None)
        return True

    async def add_replica(self, replica: Replica) -> None:
        s = self._sets.get(replica.name)
        if s is None or replica.version not in s.manifests:
            raise NotFound(f"{replica.name!r} has no version {replica.version}")
        s.replicas[replica.version][(replica.node, replica.device)] = replica

    async def remove_replica(self, name: str, version: int, node: str, device: str) -> None:
        s = self._sets.get(name)
        if s is not None:
            s.replicas.get(version, {}).pop((node, device), None)

    async def replicas(self, name: str, version: int) -> list[Replica]:
        s = self._sets.get(name)
        return list(s.replicas.get(version, {}).values()) if s else []

    async def nodes(self) -> list[NodeRecord]:
        return [self._node] if self._node else []

    async def watch(self, name: str, *, after: int = 0) -> AsyncIterator[int]:
        while True:
            async with self._changed:
                version = self._pending(name, after)
                while version is None:
                    await self._changed.wait()
                    version = self._pending(name, after)
            after = version
            yield version

    def _pending(self, name: str, after: int) -> int | None:
        s = self._sets.get(name)
        newer = [v for v in s.manifests if v > after] if s else []
        return min(newer) if newer else None
