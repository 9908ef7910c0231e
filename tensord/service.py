"""The ops of the control plane: argument checks, then the store or the cluster. One method per op."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from typing import Any

import numpy as np

from tensord import __version__
from tensord.cluster import Cluster
from tensord.config import is_device_name
from tensord.fleet import chunks as chunkmap
from tensord.fleet.chunks import MIN_CHUNK
from tensord.fleet.policy import Request
from tensord.fleet.serve import StreamPin
from tensord.ingest import default_threads
from tensord.ingest.store_sink import load_on_daemon
from tensord.memory import cuda_blocks
from tensord.peers import RemotePin
from tensord.restore import Restorer
from tensord.rpc import Session, brief
from tensord.store import Held, Store
from tensord_contract import wire
from tensord_contract.descriptors import RemoteReplica
from tensord_contract.errors import (
    InvalidArgument,
    NotFound,
    ProtocolError,
    TensordError,
    TransferError,
    Unauthorized,
    Unavailable,
)
from tensord_contract.manifest import Manifest, Table
from tensord_contract.names import MAX_VERSION, check_name, check_prefix, check_version

log = logging.getLogger(__name__)

MAX_WAIT = 300.0
_REPLICATE_TIMEOUT = 24 * 3600.0  # a replicate call returns when the copy is complete
#: put requests with more tensors than this are decoded on a worker thread, off the event loop
_OFF_LOOP_TENSORS = 2_000
_MAX_HAVE = 64


def _args(request: dict[str, Any], *required: str, optional: tuple[str, ...] = ()) -> list[Any]:
    """The request's args in order; unknown or missing keys are errors."""
    known = {"op", *required, *optional}
    unknown = set(request) - known
    if unknown:
        raise InvalidArgument(f"{request['op']}: unknown arguments {brief(sorted(unknown))}")
    missing = [k for k in required if k not in request]
    if missing:
        raise InvalidArgument(f"{request['op']}: missing arguments {missing}")
    return [request.get(k) for k in (*required, *optional)]


def _have(value: object) -> set[tuple[int, int]]:
    """The (version, generation) pairs whose manifests the client holds."""
    if value is None:
        return set()
    if not isinstance(value, list) or len(value) > _MAX_HAVE:
        raise InvalidArgument(f"have must be a list of at most {_MAX_HAVE} [version, generation] pairs")
    out = set()
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2 or not all(type(x) is int for x in pair):
            raise InvalidArgument("have must hold [version, generation] pairs of ints")
        out.add((pair[0], pair[1]))
    return out


def _nodes(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise InvalidArgument("exclude must be a list of node ids")
    return value


class Service:
    def __init__(
        self,
        store: Store,
        cluster: Cluster | None = None,
        *,
        pull_through: bool = False,
        listen: str = "",
        allowed_roots: tuple[str, ...] = (),
    ) -> None:
        self.store, self.cluster, self.pull_through, self.listen = store, cluster, pull_through, listen
        self.allowed_roots = allowed_roots
        self.restorer: Restorer | None = None  # set by the daemon: what it held before a restart
        #: set once the registry is up: the socket accepts before that (the node record needs
        #: its address), and requests other than hello wait here instead of failing
        self.ready = asyncio.Event()
        self.started = time.time()
        self._pins = itertools.count(1)
        self._watches: dict[int, dict[str, tuple[asyncio.Task[None], asyncio.Queue[int], int]]] = {}

    async def handle(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        if not self.ready.is_set() and request["op"] != "hello":
            await self.ready.wait()
        method = getattr(self, "op_" + request["op"])
        return await method(session, request)

    async def unsent(self, session: Session, op: str, result: Any) -> None:
        """A request succeeded but its reply could not be sent (too large for a frame): give
        back what it took, so nothing stays held for a client that never learnt of it."""
        if op == "put_begin":
            rid = result["reservation"]
            session.reservations.discard(rid)
            self.store.abort(rid)
        elif op == "open":
            held = session.pins.pop(result["pin"], None)
            if held is not None:
                await self._unpin(held)

    async def session_closed(self, session: Session) -> None:
        for pin in session.pins.values():
            await self._unpin(pin, clean=False)
        session.pins.clear()
        for rid in session.reservations:
            self.store.abort(rid)
        session.reservations.clear()
        for task, _, _ in self._watches.pop(session.id, {}).values():
            task.cancel()

    # -- session ------------------------------------------------------------------------------
    async def op_hello(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        protocol, client, _ = _args(request, "protocol", optional=("client", "token"))
        if protocol != wire.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol {protocol!r} unsupported; this daemon speaks {wire.PROTOCOL_VERSION}")
        session.hello = True
        if isinstance(client, str):
            session.peer = f"{client[:64]} ({session.peer})"
        transport = self.store.transport
        return {
            "protocol": wire.PROTOCOL_VERSION,
            "node": self.store.node,
            "version": __version__,
            "transport": transport.describe() if transport is not None else None,
        }, []

    # -- reading ------------------------------------------------------------------------------
    async def op_open(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version, exclude, have = _args(request, "name", optional=("version", "exclude", "have"))
        check_name(name)
        exclude, cached = _nodes(exclude), _have(have)
        version = await self.store.resolve_version(name, check_version(version))
        held = self.store.held.get((name, version))
        if (held is None or not held.live) and self.restorer is not None:  # not restored yet, or evicted
            held = await self.restorer.recover(name, version) or held
        if (held is None or not held.live) and self.cluster is not None and self.pull_through and session.local:
            held = await self.cluster.replicate(name, version, None)
        if held is not None and held.live and self.store.node not in exclude:
            replica, fds = self._descriptor(session, held)
            if not session.local and self.cluster is not None:  # a reader on another node
                self.cluster.serving.egress_reads += held.manifest.nbytes
            self.store.pin(held)
            self._moved(session, held, "read")
            pin = next(self._pins)
            session.pins[pin] = held
            known = (version, held.slab.generation) in cached
            reply = {
                "pin": pin,
                "version": version,
                "manifest": None if known else held.manifest.wire,
                "replica": replica,
            }
            return reply, fds
        if self.cluster is None:
            lost = self.restorer.lost(name, version) if self.restorer is not None else None
            message = f"{name} v{version} is not held on node {self.store.node}"
            if lost is not None:
                assert self.restorer is not None
                message = self.restorer.lost_message(name, version, lost)
            raise NotFound(message, name=name, version=version)
        result, remote = await self.cluster.pin_remote(name, version, exclude, have)
        pin = next(self._pins)
        session.pins[pin] = remote
        return {**result, "pin": pin}, []

    def _moved(self, session: Session, held: Held, direction: str) -> None:
        """Count a version's bytes handed to a reader or taken from a writer, by path."""
        path = {"cpu": "host"}.get(held.slab.device, "cuda_ipc") if session.local else "transfer_engine"
        self.store.metrics.moved(path, direction, held.manifest.data_bytes)

    def _descriptor(self, session: Session, held: Held) -> tuple[dict[str, Any], list[int]]:
        if session.local:
            return held.slab.descriptor()
        r = self.store.replica(held)
        if not r.transport:
            raise Unavailable(
                f"node {self.store.node} has no Transfer Engine: its sets are readable over its Unix socket only"
            )
        return RemoteReplica(r.node, r.device, r.transport, r.address, r.nbytes, r.generation).to_wire(), []

    async def op_release(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (pin,) = _args(request, "pin")
        held = session.pins.pop(pin, None) if isinstance(pin, int) and not isinstance(pin, bool) else None
        intact = await self._unpin(held) if held is not None else False
        return {"released": held is not None, "intact": intact}, []

    async def _unpin(self, pin: Held | RemotePin | StreamPin, *, clean: bool = True) -> bool:
        if isinstance(pin, RemotePin):
            assert self.cluster is not None
            return await self.cluster.release(pin)
        if isinstance(pin, StreamPin):
            assert self.cluster is not None
            return await self.cluster.serving.unpin(pin, clean=clean)
        self.store.unpin(pin)
        return True

    async def op_replicate(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Make one node (`to`: a node id, default this one) or several (`to`: a list of node
        ids, or "all" for every live node) pull a copy. Several pull at once as one fan-out: the
        reply comes when every one of them holds a complete, checked replica."""
        name, version, device, to, index, of, peers, rate, chunk = _args(
            request, "name", optional=("version", "device", "to", "index", "of", "peers", "rate", "chunk")
        )
        check_name(name)
        if device is not None and not isinstance(device, str):
            raise InvalidArgument("device must be a string like 'cpu' or 'cuda:0'")
        if rate is not None and (type(rate) is not int or rate < 0):
            raise InvalidArgument("rate must be bytes per second (0: no limit)")
        if chunk is not None and (type(chunk) is not int or chunk < MIN_CHUNK or chunk % 256):
            raise InvalidArgument(f"chunk must be at least {MIN_CHUNK} bytes, a multiple of 256")
        if self.cluster is None:
            raise Unavailable("replication needs a cluster (etcd) and a Transfer Engine")
        version = await self.store.resolve_version(name, check_version(version))
        if isinstance(to, list) or to == "all":
            return await self._fan_out(name, version, device, to, {"rate": rate, "chunk": chunk}), []
        if to is not None and to != self.store.node:
            if not isinstance(to, str):
                raise InvalidArgument('to must be a node id, a list of node ids, or "all"')
            record = {n.node: n for n in await self.store.registry.nodes()}.get(to)
            if record is None:
                raise NotFound(f"no live node {to!r}")
            result, _ = await self.cluster.peers.get(to, record.control).call(
                "replicate",
                name=name,
                version=version,
                device=device,
                rate=rate,
                chunk=chunk,
                reply_timeout=_REPLICATE_TIMEOUT,
            )
            return result, []
        place: dict[str, Any] = {}
        if index is not None or of is not None or peers is not None:
            if type(index) is not int or type(of) is not int or not 0 <= index < of <= 4096:
                raise InvalidArgument("index and of must be integers with 0 <= index < of <= 4096")
            place = {"index": index, "of": of, "peers": _nodes(peers)}
        held = await self.cluster.replicate(name, version, device, rate=rate, chunk=chunk, **place)
        out = {"node": self.store.node, "name": name, "version": version, "device": held.slab.device}
        done = self.cluster.finished.get((name, version))
        if done is not None and place:
            out.update({k: done[k] for k in ("seconds", "sources", "phases", "chunk")})
        return out, []

    async def _fan_out(
        self, name: str, version: int, device: str | None, to: object, knobs: dict[str, int | None]
    ) -> dict[str, Any]:
        assert self.cluster is not None
        records = {n.node: n for n in await self.store.registry.nodes()}
        if to == "all":
            targets = sorted(records)
        else:
            assert isinstance(to, list)
            targets = list(dict.fromkeys(_nodes(to)))
            missing = [t for t in targets if t not in records]
            if missing:
                raise NotFound(f"no live node {missing[0]!r}")
        holding = {r.node for r in await self.store.registry.replicas(name, version)}
        pulling = [t for t in targets if t not in holding]
        t0 = time.monotonic()

        cluster = self.cluster

        async def one(i: int, node: str) -> dict[str, Any]:
            args: dict[str, Any] = {"name": name, "version": version, "device": device, **knobs}
            args.update(index=i, of=len(pulling), peers=pulling)
            try:
                if node == self.store.node:
                    result, _ = await self.op_replicate(session_of_self, {"op": "replicate", **args})
                else:
                    peer = cluster.peers.get(node, records[node].control)
                    result, _ = await peer.call("replicate", reply_timeout=_REPLICATE_TIMEOUT, **args)
                return dict(result)
            except TensordError as exc:
                return {"node": node, "error": exc.message, "code": exc.code}

        session_of_self = Session(0, "fan-out")
        results = await asyncio.gather(*(one(i, n) for i, n in enumerate(pulling)))
        nodes = {t: {"node": t, "held": True} for t in targets if t in holding}
        nodes.update({r["node"]: r for r in results})
        failed = {n: r["error"] for n, r in nodes.items() if "error" in r}
        out = {"name": name, "version": version, "nodes": nodes, "seconds": time.monotonic() - t0}
        if failed:
            raise TransferError(
                f"{len(failed)} of {len(targets)} nodes could not replicate {name} v{version}: "
                + "; ".join(f"{n}: {e}" for n, e in sorted(failed.items())),
                name=name,
                version=version,
                failed=sorted(failed),
            )
        log.info("fan-out of %s v%d to %d nodes in %.2f s", name, version, len(targets), out["seconds"])
        return out

    # -- streaming pulls: the holder's side (tensord.fleet) -----------------------------------
    async def op_stream_open(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version, node, chunk = _args(request, "name", "version", "node", "chunk")
        check_name(name)
        if type(version) is not int or version < 1:
            raise InvalidArgument("version must be a positive integer")
        if not isinstance(node, str) or not node or len(node) > 64:
            raise InvalidArgument("node must be the puller's node id")
        if type(chunk) is not int or chunk < 256 or chunk % 256:
            raise InvalidArgument("chunk must be a positive multiple of 256 bytes")
        if self.cluster is None:
            raise Unavailable("streaming needs a cluster")
        reply, pin = self.cluster.serving.open(name, version, node, chunk)
        pid = next(self._pins)
        session.pins[pid] = pin
        return {**reply, "pin": pid}, []

    async def op_stream_chunks(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        pid, chunks, force, want, limit, start, done, declined, wait, push, device = _args(
            request,
            "pin",
            optional=("chunks", "force", "want", "limit", "start", "done", "declined", "wait", "push", "device"),
        )
        pin = session.pins.get(pid) if type(pid) is int else None
        if not isinstance(pin, StreamPin):
            raise InvalidArgument(f"pin {pid!r} is no stream pin of this connection")
        assert self.cluster is not None
        served = self.cluster.serving
        count = served.count(pin)
        wanted = None
        if want is not None:
            wanted = chunkmap.unpack(want, count) if isinstance(want, bytes) else None
            if wanted is None:
                raise InvalidArgument("want must be a chunk bitmap")
            if type(limit) is not int or not 1 <= limit <= count:
                raise InvalidArgument("limit must be a positive integer")
        if start is not None and (type(start) is not int or not 0 <= start < count):
            raise InvalidArgument("start must be a chunk index")
        if wait is not None and (not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT):
            raise InvalidArgument(f"wait must lie between 0 and {MAX_WAIT} seconds")
        if push and self.cluster.pairs is None:
            raise Unavailable(f"node {self.store.node} has pair groups off (fleet.pair_groups)")
        if push and not is_device_name(device):
            raise InvalidArgument("a push needs device: where the puller's slab lies (cpu or cuda:N)")
        req = Request(
            pin.requester,
            chunkmap.chunk_list(chunks, count),
            chunkmap.chunk_list(force, count, "force"),
            wanted,
            limit or 0,
            chunkmap.chunk_list(done, count, "done"),
            chunkmap.chunk_list(declined, count, "declined"),
        )
        result = await served.chunks(
            pin, req, start=start or 0, wait=0.0 if wait is None else wait, push=device if push else None
        )
        return result, []

    async def op_stream_pair(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Join the pair group a puller set up to receive from this node (NCCL or gloo)."""
        node, host, port, key, backend, device, to = _args(
            request, "node", "host", "port", "key", "backend", "device", "to"
        )
        if self.cluster is None or self.cluster.pairs is None:
            raise Unavailable(f"node {self.store.node} has pair groups off (fleet.pair_groups)")
        if not isinstance(node, str) or not isinstance(host, str) or not isinstance(key, str) or len(key) > 200:
            raise InvalidArgument("node, host and key must be strings")
        if type(port) is not int or not 0 < port < 65536 or backend not in ("nccl", "gloo"):
            raise InvalidArgument("port must be a TCP port and backend nccl or gloo")
        if not is_device_name(device) or not is_device_name(to):
            raise InvalidArgument("device and to must name devices (cpu or cuda:N)")
        record = {n.node: n for n in await self.store.registry.nodes()}.get(node)
        if record is None or record.control.rpartition(":")[0] != f"tcp:{host}":
            # only join a rendezvous at the address the named node advertises
            raise InvalidArgument(f"{host} is not where live node {node!r} listens")
        seconds = await asyncio.to_thread(self.cluster.pairs.join, node, host, port, key, backend, device, to)
        return {"seconds": seconds}, []

    async def op_wait(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Long poll: the next version of `name` committed after `after`, or None at timeout."""
        name, after, timeout = _args(request, "name", "after", optional=("timeout",))
        check_name(name)
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= MAX_VERSION:
            raise InvalidArgument("after must be an integer from 0 to 2**63-1")
        timeout = 30.0 if timeout is None else timeout
        if not isinstance(timeout, int | float) or not 0 <= timeout <= MAX_WAIT:
            raise InvalidArgument(f"timeout must lie between 0 and {MAX_WAIT} seconds")
        watches = self._watches.setdefault(session.id, {})
        current = watches.get(name)
        if current is None or current[2] != after:
            if current is not None:
                current[0].cancel()
            queue: asyncio.Queue[int] = asyncio.Queue()
            task = asyncio.get_running_loop().create_task(self._pump(name, after, queue))
            current = watches[name] = (task, queue, after)
        task, queue, _ = current
        try:
            version = await asyncio.wait_for(queue.get(), timeout)
        except TimeoutError:
            if task.done() and task.exception() is not None:
                watches.pop(name, None)
                raise Unavailable(f"watching {name} failed: {task.exception()}") from None
            return {"version": None}, []
        watches[name] = (task, queue, version)
        return {"version": version}, []

    async def _pump(self, name: str, after: int, queue: asyncio.Queue[int]) -> None:
        async for version in self.store.registry.watch(name, after=after):
            queue.put_nowait(version)

    # -- writing ------------------------------------------------------------------------------
    async def op_put_begin(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, device, tensors, origin = _args(request, "name", "device", "tensors", optional=("origin",))
        if not isinstance(device, str):
            raise InvalidArgument("device must be a string like 'cpu' or 'cuda:0'")
        if origin is not None and (not isinstance(origin, str) or len(origin) > 4096):
            raise InvalidArgument("origin must be a string of at most 4096 characters")
        check_name(name)
        count = tensors.get("count") if isinstance(tensors, dict) else None
        if isinstance(count, int) and count > _OFF_LOOP_TENSORS:  # a large table: keep the loop free
            table = await asyncio.to_thread(Table.from_wire, tensors, InvalidArgument)
        else:
            table = Table.from_wire(tensors, InvalidArgument)
        r = await self.store.reserve(name, device, table, origin or f"put by {session.peer}")
        session.reservations.add(r.id)
        try:
            if session.local:
                replica, fds = r.slab.descriptor()
            else:  # a writer on another node writes with its Transfer Engine
                address = self.store.expose(r.slab, writable=True)
                assert self.store.transport is not None
                session_id = self.store.transport.session
                remote = RemoteReplica(
                    self.store.node, r.slab.device, session_id, address, r.slab.nbytes, r.slab.generation
                )
                replica, fds = remote.to_wire(), []
        except BaseException:
            session.reservations.discard(r.id)
            self.store.abort(r.id)
            raise
        offsets = r.manifest.offsets.astype("<i8", copy=False).tobytes()
        return {"reservation": r.id, "offsets": offsets, "nbytes": r.manifest.nbytes, "replica": replica}, fds

    async def op_put_commit(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        rid, fingerprints = _args(request, "reservation", "fingerprints")
        self._own(session, rid)
        if not isinstance(fingerprints, bytes) or len(fingerprints) % 8:
            raise InvalidArgument("fingerprints must be bytes: one little-endian uint64 per tensor")
        held = await self.store.commit(rid, np.frombuffer(fingerprints, dtype="<u8").astype(np.uint64))
        session.reservations.discard(rid)
        self._moved(session, held, "write")
        return {"version": held.manifest.version}, []

    async def op_put_abort(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (rid,) = _args(request, "reservation")
        self._own(session, rid)
        self.store.abort(rid)
        session.reservations.discard(rid)
        return {}, []

    async def op_load(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Load a checkpoint the daemon reads itself, from a directory the config allows."""
        path, name, device, threads = _args(request, "path", "name", optional=("device", "threads"))
        check_name(name)
        if not isinstance(path, str) or not path or "\0" in path:
            raise InvalidArgument("path must be a non-empty string without NUL characters")
        if device is not None and not isinstance(device, str):
            raise InvalidArgument("device must be a string like 'cpu' or 'cuda:0'")
        if threads is None:
            threads = default_threads(device or "cpu")
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
            raise InvalidArgument("threads must be an integer from 1 to 64")
        try:
            real = await asyncio.to_thread(os.path.realpath, path)
        except OSError as exc:  # a path too long, say
            raise InvalidArgument(f"path {brief(path)}: {exc.strerror or exc}") from None
        root = next((r for r in self.allowed_roots if real == r or real.startswith(r + os.sep)), None)
        if root is None:
            raise Unauthorized(
                f"{path} is not under a directory this daemon may read "
                f"(ingest.allowed_roots: {list(self.allowed_roots) or 'none'})"
            )
        loaded = await load_on_daemon(
            self.store, session, real, name, device=device or "cpu", root=root, threads=threads, logger=log
        )
        return {"version": loaded.sets[0][1], "nbytes": loaded.nbytes}, []

    def _own(self, session: Session, rid: object) -> None:
        if type(rid) is not int or rid not in session.reservations:
            raise InvalidArgument(f"reservation {brief(rid)} does not belong to this connection")

    async def op_delete(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version = _args(request, "name", optional=("version",))
        deleted = await self.store.delete(check_name(name), check_version(version, allow_latest=False))
        log.info("deleted %s%s: %d versions", name, f" v{version}" if version else "", deleted)
        return {"deleted": deleted}, []

    # -- catalogue ----------------------------------------------------------------------------
    async def op_ls(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (prefix,) = _args(request, optional=("prefix",))
        registry = self.store.registry
        out = []
        for name in await registry.names(check_prefix(prefix or "")):
            versions = await registry.versions(name)
            if not versions:
                continue
            try:
                latest = await registry.resolve(name)
                manifest = await self._manifest(name, latest)
            except NotFound:  # deleted while listing
                continue
            replicas = await registry.replicas(name, latest)
            out.append(
                {
                    "name": name,
                    "latest": latest,
                    "versions": versions,
                    "nbytes": manifest.data_bytes,
                    "tensors": len(manifest),
                    "device": ",".join(sorted({f"{r.node}:{r.device}" if self.cluster else r.device for r in replicas}))
                    or None,
                }
            )
        return out, []

    async def op_info(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version, rows = _args(request, "name", optional=("version", "tensors"))
        if rows is not None and not isinstance(rows, bool):
            raise InvalidArgument("tensors must be true or false")
        registry = self.store.registry
        version = await self.store.resolve_version(check_name(name), check_version(version))
        held = self.store.held.get((name, version))
        manifest = await self._manifest(name, version)
        out = {
            "name": name,
            "version": version,
            "latest": await registry.resolve(name),
            "versions": await registry.versions(name),
            "count": len(manifest),
            "dtypes": manifest.dtype_counts(),
            "nbytes": manifest.data_bytes,
            "slab_bytes": manifest.nbytes,
            "created": manifest.created,
            "origin": manifest.origin,
            "device": held.slab.device if held else None,
            "pins": held.pins if held else 0,
            "lost": self.restorer.lost(name, version) if self.restorer is not None else None,
            "evicted": (name, version) in self.store.evicted,
            "replicas": [r.to_wire() for r in await registry.replicas(name, version)],
            "partials": [
                {"node": p.node, "device": p.device, "held": p.held, "chunks": p.count, "chunk": p.chunk}
                for p in await registry.partials(name, version)
            ],
        }
        if rows:
            out["tensors"] = (
                await asyncio.to_thread(manifest.rows) if len(manifest) > _OFF_LOOP_TENSORS else manifest.rows()
            )
        return out, []

    async def _manifest(self, name: str, version: int) -> Manifest:
        """A committed manifest: from memory when this node holds the version (it never changes)."""
        held = self.store.held.get((name, version))
        return held.manifest if held is not None else await self.store.registry.manifest(name, version)

    async def op_status(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        _args(request)
        store = self.store
        live: list[Held] = [h for h in store.held.values() if h.live]
        return {
            "node": store.node,
            "version": __version__,
            "uptime": time.time() - self.started,
            "listen": self.listen,
            "transport": store.transport.describe() if store.transport is not None else None,
            "devices": {
                d: {"budget": store.budgets.limit[d], "used": store.budgets.used[d], "idle": cuda_blocks.idle_bytes(d)}
                for d in store.budgets.limit
            },
            "huge_pages": store.huge_page_bytes(),
            "sets": len({h.manifest.name for h in live}),
            "versions": len(live),
            "pins": sum(h.pins for h in store.held.values()),
            "reservations": len(store.reservations),
            "eviction": store.eviction,
            "evicted": len(store.evicted),
            "restore": self.restorer.status() if self.restorer is not None else None,
            "egress": self.cluster.serving.status() if self.cluster is not None else {"bytes": 0},
            "pulls": [p.status() for p in self.cluster.running.values()] if self.cluster is not None else [],
            "pairs": self.cluster.pairs.status() if self.cluster is not None and self.cluster.pairs else None,
        }, []

    async def op_nodes(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Live nodes with their capacity and, where reachable, their use."""
        _args(request)
        records = await self.store.registry.nodes()

        async def status(record: Any) -> dict[str, Any] | None:
            if record.node == self.store.node:
                return dict((await self.op_status(session, {"op": "status"}))[0])
            if self.cluster is None:
                return None
            with contextlib.suppress(TensordError, TimeoutError):
                peer = self.cluster.peers.get(record.node, record.control)
                return dict((await asyncio.wait_for(peer.call("status"), 5.0))[0])
            return None

        statuses = await asyncio.gather(*(status(r) for r in records))
        return [{**r.to_wire(), "status": s} for r, s in zip(records, statuses, strict=True)], []
