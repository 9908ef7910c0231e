"""The daemon's Prometheus metrics, and the HTTP endpoint that serves them (`[metrics] listen`).

Counters are incremented where things happen (`rpc` for requests, `service` and `store` for
bytes, evictions, `restore` for restores); everything that is a level (sets, versions, pins,
reservations, per-device budget/used/idle, the etcd lease) is read from the daemon when a
scrape comes, by one collector, on the event loop: the endpoint is an asyncio server, so a
scrape never reads the store from another thread. prometheus-client is a daemon dependency;
the SDK never imports this module.

Bytes "moved" are counted where the daemon hands them over, by path: `host` (a same-node
reader or writer of a host slab, through its memfd), `cuda_ipc` (the same for a GPU slab),
`transfer_engine` (readers and writers on other nodes, and copies this node pulled from a
peer) and `ingest` (checkpoints the daemon read itself: loads, restores, recoveries). A read
counts the whole version it pinned (a `get` of a few names, or a mount that touches little,
counts it all).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tensord_contract.errors import InvalidArgument

log = logging.getLogger(__name__)

#: Request latency buckets, seconds: from a 100 us `status` to a minutes-long daemon-side load.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, 30, 60, 300)  # fmt: skip
PATHS = ("host", "cuda_ipc", "transfer_engine", "ingest")

#: What the level collector reads at each scrape: name -> (help, [(labels, value)]).
Levels = dict[str, tuple[str, list[tuple[dict[str, str], float]]]]


class Metrics:
    """Every metric of one daemon, in a registry of its own (several daemons may share a
    process in tests; nothing lands in prometheus-client's global registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tensord_requests", "Requests answered, by op and code (ok, or the error code)", ["op", "code"], registry=r
        )
        self.latency = Histogram(
            "tensord_request_seconds", "Time to handle a request, by op", ["op"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.bytes = Counter(
            "tensord_bytes",
            "Bytes handed over, by path (host, cuda_ipc, transfer_engine, ingest) and direction (read, write)",
            ["path", "direction"],
            registry=r,
        )
        self.evictions = Counter(
            "tensord_evictions",
            "Versions evicted under memory pressure, by device and why they could go (replica, checkpoint)",
            ["device", "reason"],
            registry=r,
        )
        self.evicted_bytes = Counter("tensord_evicted_bytes", "Bytes freed by evictions", ["device"], registry=r)
        self.restores = Counter(
            "tensord_restores",
            "Versions brought back after a restart or an eviction, by how (peer, checkpoint), or lost",
            ["outcome"],
            registry=r,
        )
        self.transfer_failures = Counter(
            "tensord_transfer_failures",
            "Failed transfers: requests answered transfer_error or integrity_error, failed pulls from peers, "
            "remote pins lost during a read",
            ["where"],
            registry=r,
        )
        self._levels: Callable[[], Levels] | None = None
        for path in PATHS:  # every path shows from the first scrape, at 0
            for direction in ("read", "write"):
                self.bytes.labels(path, direction)

    def levels(self, read: Callable[[], Levels]) -> None:
        """Read gauges from `read()` at each scrape (once)."""
        if self._levels is None:
            self.registry.register(_Levels(self))
        self._levels = read

    def observe(self, op: str, code: str, seconds: float) -> None:
        """One request answered (`rpc.Server`)."""
        self.requests.labels(op, code).inc()
        self.latency.labels(op).observe(seconds)
        if code in ("transfer_error", "integrity_error"):
            self.transfer_failures.labels(op).inc()

    def moved(self, path: str, direction: str, nbytes: int) -> None:
        self.bytes.labels(path, direction).inc(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Levels(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        read = self.metrics._levels
        if read is None:
            return
        try:
            levels = read()
        except Exception:  # a scrape must not fail on a bug here; the log says what broke
            log.exception("reading the daemon's levels for a scrape")
            return
        for name, (text, samples) in levels.items():
            labels = sorted(samples[0][0]) if samples else []
            family = GaugeMetricFamily(name, text, labels=labels)
            for values, value in samples:
                family.add_metric([values[k] for k in labels], value)
            yield family

    def describe(self) -> list[Any]:
        return []  # levels are read at scrape time only


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"metrics.listen: {listen!r} is not host:port")
    return host.strip("[]"), int(port)


class Endpoint:
    """`GET /metrics` over HTTP/1.1 on an asyncio server (one request per connection)."""

    MAX_REQUEST = 8192
    TIMEOUT = 10.0

    def __init__(self, metrics: Metrics, listen: str) -> None:
        self.metrics, self.listen = metrics, listen
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        host, port = parse_listen(self.listen)
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=self.MAX_REQUEST)
        except OSError as exc:
            raise InvalidArgument(f"cannot serve metrics on {self.listen}: {exc.strerror or exc}") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.TIMEOUT)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            target = rest.split(" ", 1)[0]
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif target.split("?", 1)[0] not in ("/metrics", "/"):
                status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                status, body, kind = "200 OK", self.metrics.render(), CONTENT_TYPE_LATEST
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await asyncio.wait_for(writer.drain(), self.TIMEOUT)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            log.debug("metrics request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
