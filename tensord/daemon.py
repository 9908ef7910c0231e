"""The daemon's lifecycle: start the registry, engine, store and server; stop in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from sdk.errors import TensordError
from sdk.transport.base import Transport
from tensord.cluster import Cluster
from tensord.config import Config
from tensord.fleet.settings import Settings
from tensord.memory import Budgets, detect_devices
from tensord.peers import Peers
from tensord.registry.base import NodeRecord, Registry
from tensord.registry.local import LocalRegistry
from tensord.rpc import Server
from tensord.service import Service
from tensord.store import Store

log = logging.getLogger(__name__)


def make_registry(config: Config) -> Registry:
    if not config.etcd_endpoints:
        return LocalRegistry()
    from tensord.registry.etcd import EtcdRegistry

    return EtcdRegistry(
        list(config.etcd_endpoints),
        prefix=config.etcd_prefix,
        lease_ttl=config.lease_ttl,
        ca_cert=config.etcd_ca_cert,
        cert_key=config.etcd_cert_key,
        cert_cert=config.etcd_cert_cert,
        user=config.etcd_user,
        password=config.etcd_password,
    )


def advertised_host(config: Config) -> str:
    """The address peers use to reach this node's listener and engine."""
    if config.transport_host:
        return config.transport_host
    host = config.listen.rpartition(":")[0]
    return host if host and host not in ("0.0.0.0", "::") else "127.0.0.1"  # noqa: S104


def make_transport(config: Config) -> Transport | None:
    if config.transport_protocol in ("off", "nccl"):  # nccl: daemons move bytes in pair groups
        return None
    from sdk.transport.mooncake import MooncakeTransport

    return MooncakeTransport(advertised_host(config), config.transport_protocol, list(config.nics) or None)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = make_registry(config)
        self.budgets = Budgets(config.budgets, detect_devices())
        self.transport: Transport | None = None
        self.store = Store(
            config.node, self.registry, self.budgets, retention=config.retention, huge_pages=config.huge_pages
        )
        self.peers = Peers(config.token)
        cluster = None
        if config.etcd_endpoints:
            cluster = Cluster(
                self.store, self.peers, settings=Settings.from_config(config), host=advertised_host(config)
            )
        self.cluster = cluster
        self.service = Service(
            self.store,
            cluster,
            pull_through=config.pull_through,
            listen=config.listen,
            allowed_roots=config.allowed_roots,
        )
        self.server = Server(
            config.socket,
            config.socket_mode,
            self.service.handle,
            self.service.session_closed,
            tcp=config.listen,
            token=config.token,
            token_reads=config.token_reads,
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.transport = await asyncio.to_thread(make_transport, self.config)
        self.store.transport = self.transport
        await self.server.start()
        control = f"unix:{self.config.socket}"
        if self.config.listen:
            control = f"tcp:{advertised_host(self.config)}:{self.server.tcp_port}"
        node = NodeRecord(
            self.config.node,
            host=socket.gethostname(),
            control=control,
            transport=self.transport.session if self.transport else "",
            devices=dict(self.budgets.limit),
        )
        await self.registry.start(node)
        if self.config.etcd_endpoints:
            self._tasks.append(asyncio.get_running_loop().create_task(self._reconcile()))
        budgets = ", ".join(f"{d}={b / 2**30:.1f}GiB" for d, b in self.budgets.limit.items())
        log.info(
            "tensord node %s ready (pid %d; registry %s; control %s; transport %s; budgets %s)",
            self.config.node,
            os.getpid(),
            type(self.registry).__name__,
            control,
            self.transport.session if self.transport else "off",
            budgets,
        )

    async def _reconcile(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_ttl)
            try:
                await self.store.reconcile()
            except TensordError as exc:
                log.warning("reconcile skipped: %s", exc.message)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.start()
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Withdraw from the registry, stop accepting and drop sessions, then free memory."""
        log.info("shutting down")
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.registry.close()
        await self.server.close()
        if self.cluster is not None:
            self.cluster.close()
        await self.peers.close()
        self.store.close()
        if self.transport is not None:
            self.transport.close()
        log.info("stopped")
