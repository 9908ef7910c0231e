"""The daemon's lifecycle: start the registry, engine, store and server; stop in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket

from tensord.config import Config, default_state_dir
from tensord.context import NodeContext
from tensord.fleet.cluster import Cluster
from tensord.fleet.settings import Settings
from tensord.memory import Budgets, detect_devices
from tensord.metrics import Endpoint, Levels, Metrics
from tensord.notify import Notifier
from tensord.ops.service import Service
from tensord.peers import Peers
from tensord.registrations import Registrations
from tensord.registry.base import NodeRecord, Registry
from tensord.registry.local import LocalRegistry
from tensord.restore import Restorer
from tensord.rpc import Server
from tensord.state import StateDir
from tensord.store import Store
from tensord_contract.errors import TensordError
from tensord_dataplane.transport.base import Transport

log = logging.getLogger(__name__)


def make_registry(config: Config, state: StateDir | None = None) -> Registry:
    if not config.etcd_endpoints:
        return LocalRegistry(state.versions if state is not None else None)
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
    from tensord_dataplane.transport import for_protocol

    return for_protocol(config.transport_protocol, advertised_host(config), config.nics)


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the new soft limit.

    Each held host-memory version keeps one descriptor (its memfd) and each connection one:
    the limit caps both. systemd/tensord.service sets the hard limit (LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel refuses more than fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < 4096:
        log.warning(
            "open-file limit is %d: each held host-memory version and each connection uses one "
            "descriptor; raise the hard limit (LimitNOFILE, ulimit -Hn) for more",
            soft,
        )
    else:
        log.info("open-file limit: %d", soft)
    return int(soft)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = StateDir(config.state_dir) if config.state_dir else None
        self.counters_only = self.state is None and not config.etcd_endpoints  # versions never reused
        if self.counters_only:
            self.state = StateDir(default_state_dir(config.socket))
        self.registry = make_registry(config, self.state)
        self.budgets = Budgets(config.budgets, detect_devices(), config.pinned_host)
        self.transport: Transport | None = None
        self.metrics = Metrics()
        self.notifier = Notifier()
        registrations = Registrations(config.node)  # with the Transfer Engine once it is started
        #: what the ops, the fleet and the restorer use besides the store
        self.context = NodeContext(config.node, self.registry, self.metrics, registrations)
        self.store = Store(
            config.node,
            self.registry,
            self.budgets,
            retention=config.retention,
            huge_pages=config.huge_pages,
            catalogue=self.state.catalogue if self.state is not None and not self.counters_only else None,
            keep_manifests=isinstance(self.registry, LocalRegistry),
            eviction=config.eviction,
            allowed_roots=config.allowed_roots,
            metrics=self.metrics,
            registrations=registrations,
        )
        self.peers = Peers(config.token)
        cluster = None
        if config.etcd_endpoints:
            cluster = Cluster(
                self.store,
                self.context,
                self.peers,
                settings=Settings.from_config(config),
                host=advertised_host(config),
            )
        self.cluster = cluster
        self.restorer = Restorer(
            self.store,
            self.context,
            cluster,
            manifests_here=isinstance(self.registry, LocalRegistry),
            on_progress=self.notifier.status,
        )
        self.service = Service(
            self.store,
            self.context,
            cluster,
            peers=self.peers,  # the fleet's parts, handed to the ops rather than reached through the cluster
            serving=cluster.serving if cluster is not None else None,
            pairs=cluster.pairs if cluster is not None else None,
            pull_through=config.pull_through,
            listen=config.listen,
            allowed_roots=config.allowed_roots,
        )
        self.server = Server(
            config.socket,
            config.socket_mode,
            self.service.handle,
            self.service.session_closed,
            undo=self.service.unsent,
            tcp=config.listen,
            token=config.token,
            token_reads=config.token_reads,
            hello_timeout=config.hello_timeout,
            frame_timeout=config.frame_timeout,
            observe=self.metrics.observe,
        )
        self.service.restorer = self.restorer
        self.endpoint = Endpoint(self.metrics, config.metrics_listen) if config.metrics_listen else None
        self.metrics.levels(self._levels)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.state is not None and self.counters_only:
            await asyncio.to_thread(self.state.open)
            log.info("no state directory (daemon.state_dir): version counters in %s, nothing restored", self.state.path)
        elif self.state is not None:
            await asyncio.to_thread(self.state.open)
            records = list(self.state.catalogue.records.values())
            manifests = self.restorer.plan(records, str(self.state.path))
            if isinstance(self.registry, LocalRegistry):  # every version it had, before serving
                for m in manifests:
                    await self.state.versions.at_least(m.name, m.version)
                self.registry.restore(manifests)
        self.transport = await asyncio.to_thread(make_transport, self.config)
        self.store.attach_transport(self.transport)
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
        if self.endpoint is not None:  # listening before the node says it is ready
            await self.endpoint.start()
        await self.registry.start(node)
        self.service.ready.set()
        if self.config.etcd_endpoints:
            self._tasks.append(asyncio.get_running_loop().create_task(self._reconcile()))
        self.restorer.start()
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

    def _levels(self) -> Levels:
        """What the metrics endpoint reads at each scrape (on the event loop)."""
        held = self.store.status()
        usage = held["devices"]
        counts = self.restorer.counts()
        devices = list(usage)

        def per_device(values: dict[str, dict[str, int]], key: str) -> list[tuple[dict[str, str], float]]:
            return [({"device": d}, float(values[d][key])) for d in devices]

        levels: Levels = {
            "tensord_sets": ("Names with a version held on this node", [({}, held["sets"])]),
            "tensord_versions": ("Versions held on this node", [({}, held["versions"])]),
            "tensord_versions_evicted": (
                "Versions evicted here that come back from their checkpoint when read",
                [({}, held["evicted"])],
            ),
            "tensord_pins": (
                "Pins readers hold on this node's versions",
                [({}, held["pins"])],
            ),
            "tensord_reservations": ("Open reservations (puts being written)", [({}, held["reservations"])]),
            "tensord_device_budget_bytes": ("Bytes each device may hold", per_device(usage, "budget")),
            "tensord_device_used_bytes": ("Bytes held or reserved per device", per_device(usage, "used")),
            "tensord_device_idle_bytes": ("Freed GPU memory kept for reuse per device", per_device(usage, "idle")),
            "tensord_device_held_bytes": ("Bytes of versions in the daemon's slabs", per_device(usage, "held")),
            "tensord_device_published_bytes": (
                "Bytes of versions in publishing processes' own memory (no copy in the daemon)",
                per_device(usage, "published"),
            ),
            "tensord_device_mapped_bytes": (
                "Bytes of the daemon's versions that clients map zero-copy (mounts: no extra copy)",
                per_device(usage, "mapped"),
            ),
            "tensord_restore_pending": (
                "Versions held before the last restart still to be restored",
                [({}, counts["pending"] + counts["running"])],
            ),
            "tensord_restore_lost": ("Versions held before the last restart that are lost", [({}, counts["lost"])]),
        }
        lease = self.registry.status().get("lease")  # only a registry with leases has one
        if lease is not None:
            levels["tensord_etcd_lease_up"] = (
                "1 while this node's etcd lease is held and kept alive, else 0",
                [({}, 1.0 if lease == "held" else 0.0)],
            )
        return levels

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        await self.start()
        restoring = len(self.restorer.jobs)
        self.notifier.ready(f"serving; restoring {restoring} held versions" if restoring else "serving")
        self._tasks.append(loop.create_task(self.notifier.watchdog(), name="watchdog"))
        await self._stop.wait()
        self.notifier.stopping()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Withdraw from the registry, stop accepting and drop sessions, then free memory. What
        the state directory records stays: the next start restores it."""
        log.info("shutting down")
        for task in self._tasks:
            task.cancel()
        await self.restorer.close()
        with contextlib.suppress(Exception):
            await self.registry.close()
        await self.server.close()
        if self.endpoint is not None:
            await self.endpoint.close()
        if self.cluster is not None:
            self.cluster.close()
        await self.peers.close()
        self.store.close()
        if self.transport is not None:
            self.transport.close()
        if self.state is not None:
            self.state.close()
        self.notifier.close()
        log.info("stopped")
