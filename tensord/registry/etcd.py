"""The etcd registry: the cluster-wide catalogue in etcd, through ``aetcd`` (asyncio).

Keys, under a configurable prefix (default ``/tensord/``); values are msgpack of ``to_wire()``
or a decimal integer::

    nodes/<node>                                   node record      node lease
    sets/<name>/@v/<version>                       manifest (head)  durable
    sets/<name>/@p/<version>/<digest>/<part>       manifest part    durable, with its version
    sets/<name>/@r/<version>/<node>/<device>       replica          node lease
    sets/<name>/@s/<version>/<node>/<device>       partial replica  node lease (a streaming pull)
    sets/<name>/@latest                            decimal version  durable, moved forward by txn
    sets/<name>/@next                              decimal version  durable, compare-and-swap

A set name is ``[a-z0-9._-]`` segments joined by ``/`` (``tensord_contract.names``): it never holds ``@``,
so the first ``/@`` of a key ends the name. A scan of set ``a``'s ``sets/a/@v/`` can never
reach set ``a/b`` (``sets/a/b/@v/...``) nor set ``a/v/1``. Versions in keys are zero-padded to
20 digits: key order is numeric order, and one version's key is never a prefix of another's.
Node and device are percent-quoted: they may hold ``:`` or ``/``.

One lease per node, granted in ``start`` and kept alive at TTL/3 by one task. Every key this
instance puts under the lease is remembered; when the lease is lost (it expired while this node
could not reach etcd, or was revoked) a new one is granted and every remembered key put again.
Every failure of etcd is mapped here, once, to ``tensord_contract.errors.Unavailable``; a call that fails
on one endpoint moves the next call to the next endpoint. Names are validated (``InvalidArgument``).
A commit of a version that exists with the same manifest only restores the replica (a retried
commit); with another manifest it raises ``VersionConflict``.

A manifest is stored zlib-compressed. One that stays under `_PART` bytes compressed lives in its
version key; a larger one (a ~100,000-tensor set compresses to ~2 MB) is cut into parts of
`_PART` bytes, written first under a key named by the body's digest, then the version key is
created with a head naming them, in the one transaction that makes the version exist: every
request stays under etcd's default ``--max-request-bytes`` (1.5 MiB), readers never see a
version without its parts, and two racing commits of one version never mix their parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aetcd
import grpc
import msgpack
from aetcd import rpc
from aetcd.utils import prefix_range_end

from tensord.registry.base import NodeRecord, PartialReplica, Registry, Replica
from tensord_contract.errors import InvalidArgument, NotFound, Unavailable, VersionConflict
from tensord_contract.manifest import Manifest
from tensord_contract.names import check_name, check_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")

_WATCH_RETRY = (0.1, 1.0)  # first and longest pause between attempts to re-watch
_MAX_MESSAGE = 64 << 20  # a large manifest; etcd itself caps requests at --max-request-bytes
_PART = 1 << 20  # bytes of compressed manifest per key: under etcd's default request limit


class _LeaseLost(Unavailable):
    """A put named a lease that etcd no longer has; the caller grants a new one and retries."""


@dataclass(frozen=True)
class _Leased:
    """A key this node holds under its lease: its value, and the key that must exist for it."""

    value: bytes
    guard: bytes | None = None  # a replica is put again only while its manifest exists


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def _grpc_code(exc: BaseException) -> grpc.StatusCode | None:
    for e in (exc, exc.__cause__):
        if isinstance(e, grpc.aio.AioRpcError):
            return e.code()
    return None


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` (an ``http(s)://`` scheme and ``[v6]`` brackets are accepted)."""
    rest = endpoint.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"etcd endpoint must be host:port, not {endpoint!r}")
    return host.strip("[]"), int(port)


class _Client(aetcd.Client):
    """aetcd's client with our own channel: TLS when credentials are given, and our options.

    aetcd 1.0 only opens plaintext channels; this replaces its ``connect`` and nothing else.
    """

    def __init__(self, host: str, port: int, *, credentials: grpc.ChannelCredentials | None, **kw: Any):
        super().__init__(host, port, **kw)
        self._credentials = credentials
        self._connect_lock = asyncio.Lock()

    async def connect(self) -> None:
        async with self._connect_lock:
            if self._connected.is_set():
                return
            target = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
            options = list(self._options.items())
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(target, options=options)
            else:
                channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            try:
                if self._username is not None and self._password is not None:
                    request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                    resp = await rpc.AuthStub(channel).Authenticate(request, timeout=self._timeout)
                    self.metadata = (("token", resp.token),)
            except BaseException:
                await channel.close()
                raise
            self.channel = channel
            self.kvstub = rpc.KVStub(channel)
            self.clusterstub = rpc.ClusterStub(channel)
            self.leasestub = rpc.LeaseStub(channel)
            self.maintenancestub = rpc.MaintenanceStub(channel)
            self._watcher = aetcd.Watcher(rpc.WatchStub(channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()


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
        if not endpoints:
            raise InvalidArgument("etcd registry needs at least one endpoint")
        if (user is None) != (password is None):
            raise InvalidArgument("etcd user and password go together")
        if (cert_key is None) != (cert_cert is None):
            raise InvalidArgument("etcd cert_key and cert_cert go together")
        if lease_ttl <= 0 or timeout <= 0:
            raise InvalidArgument("etcd lease_ttl and timeout must be positive")
        self._endpoints = list(endpoints)
        self._addrs = [_split_endpoint(e) for e in endpoints]
        self._prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._ttl = lease_ttl
        self._timeout = timeout
        self._user, self._password = user, password
        self._credentials: grpc.ChannelCredentials | None = None
        if ca_cert is not None or cert_cert is not None:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(ca_cert),
                private_key=_read(cert_key),
                certificate_chain=_read(cert_cert),
            )
        self._clients: list[_Client | None] = [None] * len(self._addrs)
        self._current = 0  # index of the endpoint in use; moves on connection failures
        self._node: NodeRecord | None = None
        self._lease: int | None = None
        self._lease_ttl = 0  # as granted
        self._leased: dict[bytes, _Leased] = {}  # what this node advertises under its lease
        self._lease_lock = asyncio.Lock()  # orders re-registration against changes of _leased
        self._keepalive: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # channels closing after a grace period
        self._closed = False
        self.keepalive_failing = False  # the last keepalive failed (metrics: lease state)

    @property
    def lease_held(self) -> bool:
        """This node holds a lease and its last keepalive succeeded."""
        return self._lease is not None and not self.keepalive_failing and not self._closed

    # -- connection and error mapping ---------------------------------------------------------

    def _client(self) -> tuple[int, _Client]:
        if self._closed:
            raise Unavailable("etcd registry is closed")
        i = self._current
        client = self._clients[i]
        if client is None:
            host, port = self._addrs[i]
            options = {
                "grpc.max_receive_message_length": _MAX_MESSAGE,
                "grpc.max_send_message_length": _MAX_MESSAGE,
                # come back quickly when etcd does (gRPC's default backoff grows to 120 s)
                "grpc.initial_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": 2000,
                # notice a silently dead peer (etcd accepts pings every 5 s or slower)
                "grpc.keepalive_time_ms": 10_000,
                "grpc.keepalive_timeout_ms": int(self._timeout * 1000),
            }
            client = _Client(
                host,
                port,
                credentials=self._credentials,
                username=self._user,
                password=self._password,
                timeout=self._timeout,  # seconds; gRPC takes a float
                options=options,
            )
            self._clients[i] = client
        return i, client

    @contextlib.contextmanager
    def _etcd(self, what: str) -> Iterator[aetcd.Client]:
        """Yield the client; map what etcd raises in the block to Unavailable, once, here."""
        index, client = self._client()
        try:
            yield client
        except aetcd.RevisionCompactedError:
            raise  # handled by watch
        except (aetcd.ClientError, grpc.RpcError, asyncio.TimeoutError) as exc:
            endpoint = self._endpoints[index]
            code = _grpc_code(exc)
            if code == grpc.StatusCode.NOT_FOUND:  # only a put under a lease etcd lacks
                raise _LeaseLost(f"etcd {what}: lease not found", endpoint=endpoint) from exc
            if code == grpc.StatusCode.UNAUTHENTICATED:
                self._drop_client(index)  # a fresh client authenticates again
            elif len(self._addrs) > 1 and self._current == index:
                self._current = (index + 1) % len(self._addrs)
                log.info("etcd %s failed on %s; trying %s next", what, endpoint, self._endpoints[self._current])
            raise Unavailable(f"etcd {what} failed on {endpoint}: {exc}", endpoint=endpoint) from exc

    def _drop_client(self, index: int) -> None:
        client, self._clients[index] = self._clients[index], None
        if client is not None and client.channel is not None:
            # let calls in flight finish; a plain close would cancel them under other tasks
            task = asyncio.get_running_loop().create_task(client.channel.close(grace=self._timeout))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- keys ---------------------------------------------------------------------------------

    def _set(self, name: str) -> str:
        return f"{self._prefix}sets/{check_name(name)}/@"

    def _vprefix(self, name: str) -> bytes:
        return f"{self._set(name)}v/".encode()

    def _vkey(self, name: str, version: int) -> bytes:
        return self._vprefix(name) + _pad(version)

    def _pprefix(self, name: str, version: int) -> bytes:
        return f"{self._set(name)}p/".encode() + _pad(version) + b"/"

    def _rprefix(self, name: str, version: int) -> bytes:
        return f"{self._set(name)}r/".encode() + _pad(version) + b"/"

    def _rkey(self, name: str, version: int, node: str, device: str) -> bytes:
        return self._rprefix(name, version) + f"{quote(node, safe='')}/{quote(device, safe='')}".encode()

    def _sprefix(self, name: str, version: int) -> bytes:
        return f"{self._set(name)}s/".encode() + _pad(version) + b"/"

    def _skey(self, name: str, version: int, node: str, device: str) -> bytes:
        return self._sprefix(name, version) + f"{quote(node, safe='')}/{quote(device, safe='')}".encode()

    def _node_key(self, node: str) -> bytes:
        return f"{self._prefix}nodes/{quote(node, safe='')}".encode()

    # -- lease --------------------------------------------------------------------------------

    async def start(self, node: NodeRecord) -> None:
        if self._keepalive is not None:
            raise RuntimeError("EtcdRegistry.start called twice")
        self._client()  # refuses after close
        async with self._lease_lock:
            self._leased[self._node_key(node.node)] = _Leased(_pack(node.to_wire()))
            try:
                await self._grant_and_register()
            except BaseException:
                self._leased.clear()
                raise
        self._node = node
        self._keepalive = asyncio.create_task(self._keep_alive(), name=f"etcd-lease-{node.node}")
        log.info(
            "registered node %s in etcd %s (lease %x, ttl %d s)",
            node.node,
            self._endpoints,
            self._lease,
            self._lease_ttl,
        )

    async def close(self) -> None:
        """Stop the keepalive, revoke the lease (its keys go with it), close the channels."""
        if self._closed:
            return
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
        if self._lease is not None:
            try:
                with self._etcd("lease revoke") as c:
                    await c.revoke_lease(self._lease)
            except Unavailable as exc:
                log.warning("could not revoke etcd lease %x (it expires by itself): %s", self._lease, exc)
        self._closed = True
        self._lease, self._node = None, None
        self._leased.clear()
        for client in self._clients:
            if client is not None:
                try:
                    await client.close()
                except Exception as exc:  # closing must not raise on the way down
                    log.warning("closing etcd client: %r", exc)

    async def _grant_and_register(self) -> None:
        """Grant a new lease and put every key this node holds under it. Holds _lease_lock.

        The new lease is adopted only once every key stands under it: if this fails half way,
        the old (lost) lease stays current and the next keepalive tries again.
        """
        with self._etcd("lease grant") as c:
            lease = await c.lease(max(1, math.ceil(self._ttl)))
        for key, entry in list(self._leased.items()):
            if not await self._put_leased(key, entry, lease.id):
                del self._leased[key]  # its version was deleted meanwhile
        self._lease, self._lease_ttl = lease.id, lease.ttl

    async def _put_leased(self, key: bytes, entry: _Leased, lease: int) -> bool:
        """Put one leased key, only while its guard exists; False when the guard is gone."""
        with self._etcd("put") as c:
            t = c.transactions
            compare = [] if entry.guard is None else [t.version(entry.guard) > 0]
            put = t.put(key, entry.value, lease=lease)
            ok, _ = await c.transaction(compare=compare, success=[put], failure=[])
        return bool(ok)

    async def _regrant(self, stale: int | None) -> None:
        """Replace lease `stale` with a new one, unless another task already did."""
        async with self._lease_lock:
            if self._lease == stale and not self._closed:
                await self._grant_and_register()
                log.warning(
                    "etcd lease lost; node %s registered again under lease %x with %d keys",
                    self._node.node if self._node else "?",
                    self._lease,
                    len(self._leased),
                )

    async def _with_lease(self, fn: Callable[[int], Awaitable[T]]) -> T:
        """Run `fn(lease)` under the lease lock; when etcd says the lease is gone, re-grant once."""
        lease = self._require_lease()
        try:
            async with self._lease_lock:
                return await fn(lease)
        except _LeaseLost:
            await self._regrant(lease)
        lease = self._require_lease()
        async with self._lease_lock:
            return await fn(lease)

    def _require_lease(self) -> int:
        if self._lease is None:
            raise RuntimeError("EtcdRegistry used before start()")
        return self._lease

    async def _keep_alive(self) -> None:
        """Refresh the lease every TTL/3; re-grant and re-register when it is gone."""
        failing = False
        while True:
            await asyncio.sleep(self._lease_ttl / 3)
            lease = self._lease
            try:
                with self._etcd("lease keepalive") as c:
                    reply = await c.refresh_lease(lease)
                if reply is None or reply.TTL <= 0:
                    await self._regrant(lease)
                if failing:
                    log.info("etcd reachable again; lease %x holds", self._lease)
                failing = self.keepalive_failing = False
            except Unavailable as exc:
                if not failing:
                    log.warning("etcd lease keepalive failing (will retry): %s", exc)
                failing = self.keepalive_failing = True
            except Exception:  # a bug here must not end the lease silently
                log.exception("etcd lease keepalive")

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
            current, mod = (int(found[0][0]), found[0][1].mod_revision) if found else (0, 0)

    async def allocate_version(self, name: str) -> int:
        # `next` holds the version the next caller gets; absent means 1
        key = self._set(name).encode() + b"next"
        return max(await self._cas(key, "allocate version", lambda cur: max(cur, 1) + 1), 1)

    async def commit(self, manifest: Manifest, replica: Replica) -> None:
        name, version = manifest.name, manifest.version
        if (replica.name, replica.version) != (name, version):
            raise InvalidArgument(f"replica of {replica.name}@{replica.version} given with {name}@{version}")
        if version < 1:
            raise InvalidArgument(f"version must be positive, not {version}", name=name, version=version)
        vkey = self._vkey(name, version)
        rkey = self._rkey(name, version, replica.node, replica.device)
        head, parts = await asyncio.to_thread(_encode, manifest.to_wire())
        pkeys = [self._pprefix(name, version) + head.get("digest", b"") + b"/" + _pad(i) for i in range(len(parts))]
        body, entry = _pack(head), _Leased(_pack(replica.to_wire()), guard=vkey)
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
                    if pkeys and _unpack(found[0][0]).get("digest") != head.get("digest"):
                        with self._etcd("drop manifest parts") as c:  # ours, not the winner's
                            await c.delete_prefix(pkeys[0].rpartition(b"/")[0] + b"/")
                    raise VersionConflict(
                        f"{name!r} version {version} is committed already", name=name, version=version
                    )
                # the same manifest: a retried commit; make sure the replica stands
                if not await self._put_leased(rkey, entry, lease):
                    raise NotFound(f"{name!r} version {version} was deleted", name=name, version=version)
            self._leased[rkey] = entry

        await self._with_lease(publish)
        # latest moves forward only; a concurrent commit of a newer version wins
        key = self._set(name).encode() + b"latest"
        await self._cas(key, "move latest", lambda cur: version if version > cur else None)

    async def resolve(self, name: str, version: int | None = None) -> int:
        if version is not None:
            if version >= 1 and await self._exists(self._vkey(name, version)):
                return version
            raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
        with self._etcd("resolve") as c:
            latest = await c.get(self._set(name).encode() + b"latest")
        if latest is not None and await self._exists(self._vkey(name, int(latest.value))):
            return int(latest.value)
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
                found = await c.get(self._vkey(name, version))
        if found is None:
            raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
        head = _unpack(found.value)
        parts: list[bytes] = []
        if isinstance(head, dict) and head.get("parts"):
            prefix = self._pprefix(name, version) + bytes(head.get("digest", b"")) + b"/"
            with self._etcd("get manifest parts") as c:
                parts = [kv.value for kv in sorted(await c.get_prefix(prefix), key=lambda kv: kv.key)]
        return await asyncio.to_thread(_decode, head, parts)

    async def versions(self, name: str) -> list[int]:
        prefix = self._vprefix(name)
        with self._etcd("list versions") as c:
            found = await c.get_prefix(prefix, keys_only=True)
        return sorted(int(kv.key[len(prefix) :]) for kv in found)

    async def names(self, prefix: str = "") -> list[str]:
        sets = f"{self._prefix}sets/"
        with self._etcd("list names") as c:
            found = await c.get_prefix((sets + check_prefix(prefix)).encode(), keys_only=True)
        names = set()
        for kv in found:
            name, _, kind = kv.key.decode()[len(sets) :].partition("/@")
            if kind.startswith("v/") and name.startswith(prefix):
                names.add(name)
        return sorted(names)

    async def delete_version(self, name: str, version: int) -> bool:
        if version < 1:
            return False
        vkey, rprefix, pprefix = self._vkey(name, version), self._rprefix(name, version), self._pprefix(name, version)
        sprefix = self._sprefix(name, version)
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
        if version < 1:
            raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
        key = self._rkey(name, version, replica.node, replica.device)
        entry = _Leased(_pack(replica.to_wire()), guard=self._vkey(name, version))

        async def put(lease: int) -> None:
            if not await self._put_leased(key, entry, lease):
                raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
            self._leased[key] = entry

        await self._with_lease(put)

    async def remove_replica(self, name: str, version: int, node: str, device: str) -> None:
        if version < 1:
            return
        key = self._rkey(name, version, node, device)
        async with self._lease_lock:
            self._leased.pop(key, None)
            with self._etcd("remove replica") as c:
                await c.delete(key)

    async def replicas(self, name: str, version: int) -> list[Replica]:
        if version < 1:
            return []
        with self._etcd("list replicas") as c:
            found = await c.get_prefix(self._rprefix(name, version))
        return [Replica.from_wire(_unpack(kv.value)) for kv in found]

    async def put_partial(self, partial: PartialReplica) -> None:
        name, version = partial.name, partial.version
        if version < 1:
            raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
        key = self._skey(name, version, partial.node, partial.device)
        entry = _Leased(_pack(partial.to_wire()), guard=self._vkey(name, version))

        async def put(lease: int) -> None:
            if not await self._put_leased(key, entry, lease):
                raise NotFound(f"{name!r} has no version {version}", name=name, version=version)
            self._leased[key] = entry

        await self._with_lease(put)

    async def remove_partial(self, name: str, version: int, node: str, device: str) -> None:
        if version < 1:
            return
        key = self._skey(name, version, node, device)
        async with self._lease_lock:
            self._leased.pop(key, None)
            with self._etcd("remove partial replica") as c:
                await c.delete(key)

    async def partials(self, name: str, version: int) -> list[PartialReplica]:
        if version < 1:
            return []
        with self._etcd("list partial replicas") as c:
            found = await c.get_prefix(self._sprefix(name, version))
        return [PartialReplica.from_wire(_unpack(kv.value)) for kv in found]

    async def nodes(self) -> list[NodeRecord]:
        with self._etcd("list nodes") as c:
            found = await c.get_prefix(f"{self._prefix}nodes/".encode())
        return sorted((NodeRecord.from_wire(_unpack(kv.value)) for kv in found), key=lambda n: n.node)

    # -- watch --------------------------------------------------------------------------------

    async def watch(self, name: str, *, after: int = 0) -> AsyncIterator[int]:
        """List the versions after `after`, then watch for new ones from the listing's revision.

        A broken stream is resumed from the revision after the last event seen; when that
        revision was compacted away, list again. Versions come in increasing order, each once:
        one committed out of order (below one already delivered) is skipped.
        """
        prefix = self._vprefix(name)
        last = after
        start: int | None = None  # revision to watch from; None: list first
        pause = _WATCH_RETRY[0]
        while not self._closed:
            try:
                if start is None:
                    with self._etcd("watch list") as c:
                        listing = await c.get_prefix(prefix, keys_only=True)
                    start = listing.header.revision + 1
                    for v in sorted(int(kv.key[len(prefix) :]) for kv in listing):
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
                            v = int(event.kv.key[len(prefix) :])
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
                if self._closed:
                    return
                log.debug("watch of %r interrupted, resuming from revision %s: %s", name, start, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _WATCH_RETRY[1])


def _pad(version: int) -> bytes:
    return f"{version:020d}".encode()


def _encode(wire: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """A manifest as the version key's head and the parts it names (none when it fits)."""
    body = zlib.compress(_pack(wire), 1)
    if len(body) <= _PART:
        return {"zlib": body}, []
    digest = hashlib.sha256(body).hexdigest()[:32].encode()
    parts = [body[i : i + _PART] for i in range(0, len(body), _PART)]
    return {"parts": len(parts), "bytes": len(body), "digest": digest}, parts


def _decode(head: Any, parts: list[bytes]) -> Manifest:
    from tensord_contract.errors import ProtocolError

    try:
        if isinstance(head, dict) and "zlib" in head:
            body = head["zlib"]
        elif isinstance(head, dict) and head.get("parts") == len(parts):
            body = b"".join(parts)
            if len(body) != head.get("bytes") or hashlib.sha256(body).hexdigest()[:32].encode() != head.get("digest"):
                raise ProtocolError("a manifest's parts in etcd do not add up")
        else:
            raise ProtocolError(f"a manifest in etcd has {len(parts)} parts, its head says {head!r:.100}")
        return Manifest.from_wire(_unpack(zlib.decompress(body)))
    except (zlib.error, ValueError, TypeError) as exc:
        raise ProtocolError(f"a manifest in etcd cannot be read: {exc}") from exc


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
