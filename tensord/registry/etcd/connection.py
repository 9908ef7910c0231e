"""Connections to etcd: one client per endpoint, failover between them, and errors mapped once.

Every failure of etcd is mapped here to ``tensord_contract.errors.Unavailable`` (a put under a
lease etcd no longer has to its subclass `LeaseNotFound`); a call that fails on one endpoint
moves the next call to the next endpoint.

aetcd 1.0 only opens plaintext channels, so `_Client` replaces its ``connect``, a private
method. That override is written against aetcd `AETCD_VERSION` and relies on the internals
listed in `_AETCD_INTERNALS`: another version logs a warning, missing internals are an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
from aetcd import rpc

from tensord_contract.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

AETCD_VERSION = "1.0.0"  # the aetcd whose private Client.connect `_Client` replaces
# what `_Client.connect` reads from, or sets on, aetcd.Client
_AETCD_INTERNALS = ("_host", "_port", "_username", "_password", "_timeout", "_options", "_connected", "_watcher")
_MAX_MESSAGE = 64 << 20  # a large manifest; etcd itself caps requests at --max-request-bytes
_version_checked = False


class LeaseNotFound(Unavailable):
    """A put named a lease that etcd no longer has; the caller grants a new one and retries."""


def _check_aetcd(client: aetcd.Client) -> None:
    """Warn once when aetcd is not the version `_Client` was written for; refuse when the
    internals it relies on are gone (better than a confusing AttributeError mid-call)."""
    global _version_checked
    if not _version_checked:
        _version_checked = True
        found = importlib.metadata.version("aetcd")
        if found != AETCD_VERSION:
            log.warning(
                "aetcd %s installed; tensord's etcd connection replaces aetcd.Client.connect as of "
                "aetcd %s: check tensord/registry/etcd/connection.py against this version",
                found,
                AETCD_VERSION,
            )
    missing = [a for a in _AETCD_INTERNALS if not hasattr(client, a)]
    if missing:
        raise RuntimeError(
            f"aetcd {importlib.metadata.version('aetcd')} lacks {', '.join(missing)}: tensord's etcd "
            f"connection (tensord/registry/etcd/connection.py) was written for aetcd {AETCD_VERSION}"
        )


class _Client(aetcd.Client):
    """aetcd's client with our own channel: TLS when credentials are given, and our options.

    This replaces aetcd's ``connect`` and nothing else.
    """

    def __init__(self, host: str, port: int, *, credentials: grpc.ChannelCredentials | None, **kw: Any):
        super().__init__(host, port, **kw)
        _check_aetcd(self)
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


class Connection:
    """The clients of a list of endpoints; one is current and moves on connection failures."""

    def __init__(
        self,
        endpoints: list[str],
        *,
        timeout: float,
        ca_cert: str | None = None,
        cert_key: str | None = None,
        cert_cert: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise InvalidArgument("etcd registry needs at least one endpoint")
        if (user is None) != (password is None):
            raise InvalidArgument("etcd user and password go together")
        if (cert_key is None) != (cert_cert is None):
            raise InvalidArgument("etcd cert_key and cert_cert go together")
        self.endpoints = list(endpoints)
        self._addrs = [_split_endpoint(e) for e in endpoints]
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
        self._current = 0  # index of the endpoint in use
        self._background: set[asyncio.Task[None]] = set()  # channels closing after a grace period
        self.closed = False

    @property
    def endpoint(self) -> str:
        """The endpoint the next call goes to."""
        return self.endpoints[self._current]

    def client(self) -> tuple[int, _Client]:
        if self.closed:
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
    def call(self, what: str) -> Iterator[aetcd.Client]:
        """Yield the client; map what etcd raises in the block to Unavailable, once, here."""
        index, client = self.client()
        try:
            yield client
        except aetcd.RevisionCompactedError:
            raise  # handled by watch
        except (aetcd.ClientError, grpc.RpcError, asyncio.TimeoutError) as exc:
            endpoint = self.endpoints[index]
            code = _grpc_code(exc)
            if code == grpc.StatusCode.NOT_FOUND:  # only a put under a lease etcd lacks
                raise LeaseNotFound(f"etcd {what}: lease not found", endpoint=endpoint) from exc
            if code == grpc.StatusCode.UNAUTHENTICATED:
                self._drop_client(index)  # a fresh client authenticates again
            elif len(self._addrs) > 1 and self._current == index:
                self._current = (index + 1) % len(self._addrs)
                log.info("etcd %s failed on %s; trying %s next", what, endpoint, self.endpoints[self._current])
            raise Unavailable(f"etcd {what} failed on {endpoint}: {exc}", endpoint=endpoint) from exc

    def _drop_client(self, index: int) -> None:
        client, self._clients[index] = self._clients[index], None
        if client is not None and client.channel is not None:
            # let calls in flight finish; a plain close would cancel them under other tasks
            task = asyncio.get_running_loop().create_task(client.channel.close(grace=self._timeout))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        self.closed = True
        for client in self._clients:
            if client is not None:
                try:
                    await client.close()
                except Exception as exc:  # closing must not raise on the way down
                    log.warning("closing etcd client: %r", exc)


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


def _read(path: str | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()
