"""The daemon's lifecycle: start the registry, the store and the server; stop in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from tensord.config import Config
from tensord.memory import Budgets, detect_devices
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

    return EtcdRegistry(list(config.etcd_endpoints), prefix=config.etcd_prefix, lease_ttl=config.lease_ttl)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = make_registry(config)
        self.budgets = Budgets(config.budgets, detect_devices())
        self.store = Store(config.node, self.registry, self.budgets, retention=config.retention)
        self.service = Service(self.store)
        self.server = Server(
            config.socket, config.socket_mode, self.service.handle, self.service.session_closed
        )
        self._stop = asyncio.Event()

    async def start(self) -> None:
        node = NodeRecord(
            self.config.node, host=socket.gethostname(), control=f"unix:{self.config.socket}",
            devices=dict(self.budgets.limit),
        )  # fmt: skip
        await self.registry.start(node)
        await self.server.start()
        budgets = ", ".join(f"{d}={b / 2**30:.1f}GiB" for d, b in self.budgets.limit.items())
        log.info("tensord node %s ready (pid %d; registry %s; budgets %s)", self.config.node,
                 os.getpid(), type(self.registry).__name__, budgets)  # fmt: skip

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
        with contextlib.suppress(Exception):
            await self.registry.close()
        await self.server.close()
        self.store.close()
        log.info("stopped")
