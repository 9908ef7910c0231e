"""The etcd registry: the cluster-wide catalogue in etcd, through ``aetcd`` (asyncio).

The key schema is in `keys`, the value encodings in `values`, endpoint failover and the one
mapping of etcd's failures to ``Unavailable`` in `connection`, the node's lease in `lease`.

Every key this instance puts under the node's lease is remembered here (`_leased`); when the
lease is lost the session grants a new one and `_register` puts every remembered key again
(a replica only while its version exists). A commit of a version that exists with the same
manifest only restores the replica (a retried commit); with another manifest it raises
``VersionConflict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aetcd
from aetcd.utils import prefix_range_end

from tensord.registry.base import NodeRecord, PartialReplica, Registry, Replica
from tensord.registry.etcd.connection import Connection
from tensord.registry.etcd.keys import Keys
from tensord.registry.etcd.lease import LeaseSession
from tensord.registry.etcd.values import decode_manifest, encode_manifest, pack, unpack
from tensord_contract.errors import InvalidArgument, NotFound, OutOfCapacity, Unavailable, VersionConflict
from tensord_contract.manifest import Manifest
from tensord_contract.names import MAX_VERSION

log = logging.getLogger(__name__)

_WATCH_RETRY = (0.1, 1.0)  # first and longest pause between attempts to re-watch


@dataclass(frozen=True)
class _Leased:
    """A key this node holds under its lease: its value, and the key that must exist for it."""

    value: bytes
    guard: bytes | None = None  # a replica is put again only while its manifest exists


class EtcdRegistry(Registry):
    """The registry in etcd. One instance per daemon; safe for concurrent use by tasks."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        prefix: str = "/tensord/",
        lease_ttl: float = 10.0,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if lease_ttl <= 0 or timeout <= 0:
            raise InvalidArgument("etcd lease_ttl and timeout must be positive")
        self._conn = Connection(
            endpoints,
            timeout=timeout,
            ca_cert=ca_cert,
            cert_key=cert_key,
            cert_cert=cert_cert,
            user=user,
            password=password,
        )
        self._etcd = self._conn.call  # `with self._etcd(what) as client:` maps failures once
        self._keys = Keys(prefix)
        self._prefix = self._keys.prefix
        self._lease = LeaseSession(self._conn, lease_ttl, self._register)
        self._leased: dict[bytes, _Leased] = {}  # what this node advertises under its lease

    @property
    def lease(self) -> LeaseSession:
        """The node's lease session (granted in `start`)."""
        return self._lease

    def status(self) -> dict[str, Any]:
        return {"kind": "etcd", "endpoint": self._conn.endpoint, **self._lease.status(), "keys": len(self._leased)}

    # -- lease --------------------------------------------------------------------------------

    async def start(self, node: NodeRecord) -> None:
        self._conn.client()  # refuses after close
        session = self._lease
        async with session.lock:
            self._leased[self._keys.node(node.node)] = _Leased(pack(node.to_wire()))
        try:
            await session.start(node.node)
        except BaseException:
            self._leased.clear()
            raise
        log.info(
            "registered node %s in etcd %s (lease %x, ttl %d s)",
            node.node,
            self._conn.endpoints,
            session.id,
            session.ttl,
        )

    async def close(self) -> None:
        """Stop the keepalive, revoke the lease (its keys go with it), close the channels."""
        if self._conn.closed:
            return
        await self._lease.close()
        self._leased.clear()
        await self._conn.close()

    async def _register(self, lease: int) -> None:
        """Put every key this node holds under `lease` (the session holds its lock)."""
        for key, entry in list(self._leased.items()):
            if not await self._put_leased(key, entry, lease):
                del self._leased[key]  # its version was deleted meanwhile
        log.debug("%d keys registered under etcd lease %x", len(self._leased), lease)

    async def _put_leased(self, key: bytes, entry: _Leased, lease: int) -> bool:
        """Put one leased key, only while its guard exists; False when the guard is gone."""
        with self._etcd("put") as c:
            t = c.transactions
            compare = [] if entry.guard is None else [t.version(entry.guard) > 0]
            put = t.put(key, entry.value, lease=lease)
            ok, _ = await c.transaction(compare=compare, success=[put], failure=[])
        return bool(ok)

    async def _advertise(self, key: bytes, entry: _Leased, missing: NotFound) -> None:
        """Put `key` under the lease and remember it; `missing` when its version is gone."""

        async def put(lease: int) -> None:
            if not await self._put_leased(key, entry, lease):
                raise missing
            self._leased[key] = entry

        await self._lease.with_lease(put)

    async def _withdraw(self, key: bytes, what: str) -> None:
        async with self._lease.lock:
            self._leased.pop(key, None)
            with self._etcd(what) as c:
                await c.delete(key)

    # -- versions -----------------------------------------------------------------------------

    async def _cas(self, key: bytes, what: str, step: Callable[[int], int | None]) -> int:
        """Compare-and-swap the decimal at `key` (0 when absent) to step(current), unless None.

        Returns the value it replaced. The first try assumes the key absent; a failed try
        returns the current value and its revision, so each retry is one round trip.
        """
        current, mod = 0, 0
        while True:
            new = step(current)
            if new is None:
                return current
            with self._etcd(what) as c:
                t = c.transactions
                ok, resp = await c.transaction(
                    compare=[t.mod(key) == mod], success=[t.put(key, str(new).encode())], failure=[t.get(key)]
                )
            if ok:
                return current
            found = resp[0] if resp else []
            current, mod = (_counter(key, found[0][0]), found[0][1].mod_revision) if found else (0, 0)

    async def allocate_version(self, name: str) -> int:
        # `next` holds the version the next caller gets; absent means 1
        version = max(await self._cas(self._keys.next(name), "allocate version", _advance), 1)
        if version > MAX_VERSION:  # a version every reader can decode, or none
            raise OutOfCapacity(f"{name} has used every version up to {MAX_VERSION}: use another name", name=name)
        return version

    async def commit(self, manifest: Manifest, replica: Replica) -> None:
        name, version = manifest.name, manifest.version
        if (replica.name, replica.version) != (name, version):
            raise InvalidArgument(f"replica of {replica.name}@{replica.version} given with {name}@{version}")
        if version < 1:
            raise InvalidArgument(f"version must be positive, not {version}", name=name, version=version)
        keys = self._keys
        vkey = keys.version(name, version)
        rkey = keys.replica(name, version, replica.node, replica.device)
        head, parts = await asyncio.to_thread(encode_manifest, manifest.to_wire())
        digest = head.get("digest", b"")
        pkeys = [keys.part(name, version, digest, i) for i in range(len(parts))]
        body, entry = pack(head), _Leased(pack(replica.to_wire()), guard=vkey)
        for key, part in zip(pkeys, parts, strict=True):  # invisible until the version key names them
            with self._etcd("commit manifest part") as c:
                await c.put(key, part)

        async def publish(lease: int) -> None:
            with self._etcd("commit") as c:
                t = c.transactions
                ok, resp = await c.transaction(
                    compare=[t.version(vkey) == 0],
                    success=[t.put(vkey, body), t.put(rkey, entry.value, lease=lease)],
                    failure=[t.get(vkey)],
                )
            if not ok:
                found = resp[0] if resp else []
                if found and found[0][0] != body:
                    if pkeys and unpack(found[0][0]).get("digest") != digest:
                        with self._etcd("drop manifest parts") as c:  # ours, not the winner's
                            await c.delete_prefix(keys.parts(name, version, digest))
                    raise VersionConflict(
                        f"{name!r} version {version} is committed already", name=name, version=version
                    )
                # the same manifest: a retried commit; make sure the replica stands
                if not await self._put_leased(rkey, entry, lease):
                    raise NotFound(f"{name!r} version {version} was deleted", name=name, version=version)
            self._leased[rkey] = entry

        await self._lease.with_lease(publish)
        # latest moves forward only; a concurrent commit of a newer version wins
        await self._cas(keys.latest(name), "move latest", lambda cur: version if version > cur else None)

    async def resolve(self, name: str, version: int | None = None) -> int:
        if version is not None:
            if version >= 1 and await self._exists(self._keys.version(name, version)):
                return version
            raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
        with self._etcd("resolve") as c:
            latest = await c.get(self._keys.latest(name))
        newest = None if latest is None else _counter(self._keys.latest(name), latest.value)
        if newest is not None and await self._exists(self._keys.version(name, newest)):
            return newest
        existing = await self.versions(name)  # latest was deleted: the newest that remains
        if not existing:
            raise NotFound(f"no set named {name!r}", name=name)
        return existing[-1]

    async def _exists(self, key: bytes) -> bool:
        # a prefix scan is exact here: version keys have a fixed width
        with self._etcd("get") as c:
            return bool(await c.get_prefix(key, keys_only=True))

    async def manifest(self, name: str, version: int) -> Manifest:
        found = None
        if version >= 1:
            with self._etcd("get manifest") as c:
                found = await c.get(self._keys.version(name, version))
        if found is None:
            raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
        head = unpack(found.value)
        parts: list[bytes] = []
        if isinstance(head, dict) and head.get("parts"):
            prefix = self._keys.parts(name, version, bytes(head.get("digest", b"")))
            with self._etcd("get manifest parts") as c:
                parts = [kv.value for kv in sorted(await c.get_prefix(prefix), key=lambda kv: kv.key)]
        return await asyncio.to_thread(decode_manifest, head, parts)

    async def versions(self, name: str) -> list[int]:
        prefix = self._keys.versions(name)
        with self._etcd("list versions") as c:
            found = await c.get_prefix(prefix, keys_only=True)
        return sorted(Keys.version_of(prefix, kv.key) for kv in found)

    async def names(self, prefix: str = "") -> list[str]:
        with self._etcd("list names") as c:
            found = await c.get_prefix(self._keys.names(prefix), keys_only=True)
        names = {self._keys.name_of_version_key(kv.key) for kv in found}
        return sorted(n for n in names if n is not None and n.startswith(prefix))

    async def delete_version(self, name: str, version: int) -> bool:
        if version < 1:
            return False
        keys = self._keys
        vkey, rprefix, sprefix = keys.version(name, version), keys.replicas(name, version), keys.partials(name, version)
        pprefix = keys.parts(name, version)
        with self._etcd("delete version") as c:
            t = c.transactions
            ok, _ = await c.transaction(
                compare=[t.version(vkey) > 0],
                success=[
                    t.delete(vkey),
                    t.delete(rprefix, range_end=prefix_range_end(rprefix)),
                    t.delete(pprefix, range_end=prefix_range_end(pprefix)),
                    t.delete(sprefix, range_end=prefix_range_end(sprefix)),
                ],
                failure=[],
            )
        for key in [k for k in self._leased if k.startswith((rprefix, sprefix))]:
            self._leased.pop(key, None)
        return bool(ok)

    # -- replicas and nodes -------------------------------------------------------------------

    async def add_replica(self, replica: Replica) -> None:
        name, version = replica.name, replica.version
        missing = NotFound(f"{name!r} has no version {version}", name=name, version=version)
        if version < 1:
            raise missing
        key = self._keys.replica(name, version, replica.node, replica.device)
        entry = _Leased(pack(replica.to_wire()), guard=self._keys.version(name, version))
        await self._advertise(key, entry, missing)

    async def remove_replica(self, name: str, version: int, node: str, device: str) -> None:
        if version >= 1:
            await self._withdraw(self._keys.replica(name, version, node, device), "remove replica")

    async def replicas(self, name: str, version: int) -> list[Replica]:
        if version < 1:
            return []
        with self._etcd("list replicas") as c:
            found = await c.get_prefix(self._keys.replicas(name, version))
        return [Replica.from_wire(unpack(kv.value)) for kv in found]

    async def put_partial(self, partial: PartialReplica) -> None:
        name, version = partial.name, partial.version
        missing = NotFound(f"{name!r} has no version {version}", name=name, version=version)
        if version < 1:
            raise missing
        key = self._keys.partial(name, version, partial.node, partial.device)
        entry = _Leased(pack(partial.to_wire()), guard=self._keys.version(name, version))
        await self._advertise(key, entry, missing)

    async def remove_partial(self, name: str, version: int, node: str, device: str) -> None:
        if version >= 1:
            await self._withdraw(self._keys.partial(name, version, node, device), "remove partial replica")

    async def partials(self, name: str, version: int) -> list[PartialReplica]:
        if version < 1:
            return []
        with self._etcd("list partial replicas") as c:
            found = await c.get_prefix(self._keys.partials(name, version))
        return [PartialReplica.from_wire(unpack(kv.value)) for kv in found]

    async def nodes(self) -> list[NodeRecord]:
        with self._etcd("list nodes") as c:
            found = await c.get_prefix(self._keys.nodes())
        return sorted((NodeRecord.from_wire(unpack(kv.value)) for kv in found), key=lambda n: n.node)

    # -- watch --------------------------------------------------------------------------------

    async def watch(self, name: str, *, after: int = 0) -> AsyncIterator[int]:
        """List the versions after `after`, then watch for new ones from the listing's revision.

        A broken stream is resumed from the revision after the last event seen; when that
        revision was compacted away, list again. Versions come in increasing order, each once:
        one committed out of order (below one already delivered) is skipped.
        """
        prefix = self._keys.versions(name)
        last = after
        start: int | None = None  # revision to watch from; None: list first
        pause = _WATCH_RETRY[0]
        while not self._conn.closed:
            try:
                if start is None:
                    with self._etcd("watch list") as c:
                        listing = await c.get_prefix(prefix, keys_only=True)
                    start = listing.header.revision + 1
                    for v in sorted(Keys.version_of(prefix, kv.key) for kv in listing):
                        if v > last:
                            last = v
                            yield v
                with self._etcd("watch") as c:
                    stream = await c.watch_prefix(prefix, start_revision=start, kind=aetcd.EventKind.PUT)
                try:
                    with self._etcd("watch") as c:
                        async for event in stream:
                            pause = _WATCH_RETRY[0]
                            start = event.kv.mod_revision + 1
                            v = Keys.version_of(prefix, event.kv.key)
                            if v > last:
                                last = v
                                yield v
                finally:
                    with contextlib.suppress(Exception):
                        await stream.cancel()
            except aetcd.RevisionCompactedError as exc:
                log.info("watch of %r: revision %s compacted; listing again", name, start, exc_info=exc)
                start = None
            except Unavailable as exc:
                if self._conn.closed:
                    return
                log.debug("watch of %r interrupted, resuming from revision %s: %s", name, start, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _WATCH_RETRY[1])


def _advance(current: int) -> int | None:
    """The next version counter: past the last decodable version it stays (nothing allocated)."""
    return None if current > MAX_VERSION else max(current, 1) + 1


def _counter(key: bytes, raw: bytes) -> int:
    """A counter's value in etcd: a decimal from 0 to 2**63, else Unavailable naming the key."""
    text = raw.decode("ascii", "replace")
    if not (text.isascii() and text.isdigit() and len(text) <= 20 and int(text) <= MAX_VERSION + 1):
        raise Unavailable(f"the registry's counter {key.decode(errors='replace')!r} holds {text[:40]!r}, no version")
    return int(text)
