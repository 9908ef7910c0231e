"""The control-plane half of the client: one daemon connection and every op that moves no
tensor bytes (ls, info, delete, status, nodes, replicate, watch, load_checkpoint).

It imports neither torch nor numpy, so tools that only look at the catalogue (the `tensord ls`,
`info`, `status`, `nodes`, `rm` commands) start in a few tens of milliseconds. `sdk.Client`
extends it with the data plane (get, mount, put, load_into, reserve).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sdk.connection import Connection, endpoint
from sdk.settings import Settings
from tensord_contract.catalogue_messages import (
    InfoReply,
    InfoRequest,
    LoadReply,
    LoadRequest,
    LsReply,
    LsRequest,
    WaitReply,
    WaitRequest,
)
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument, NotFound, ProtocolError, TensordError, Unavailable
from tensord_contract.message_checks import is_number
from tensord_contract.names import MAX_VERSION, check_name, check_prefix, check_version
from tensord_contract.node_messages import NodesReply, NodesRequest, StatusReply, StatusRequest
from tensord_contract.rows import TensorRows

log = logging.getLogger("sdk.client")
_WATCH_POLL = 30.0  # seconds one long poll waits
C = TypeVar("C", bound="CatalogueClient")


class CatalogueClient:
    """A connection to one tensord daemon for catalogue and cluster operations; no data plane.

    Thread-safe; a context manager; unusable after close. Arguments as for `sdk.Client`:
    `socket` (a Unix socket path), `address` ("host:port" of a TCP listener), `token`,
    `timeout` (seconds to wait for any one reply). Reconnects by itself when the daemon
    restarted (what was tied to the old connection is gone).
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        timeout: float | None = 300.0,
    ) -> None:
        self.settings = Settings.from_env()
        self.endpoint = endpoint(socket, address, self.settings)
        self.token = token if token is not None else self.settings.token
        self.timeout = timeout
        self._connection: Connection | None = None
        self._closed = False
        self._lock = threading.Lock()

    # -- connection -------------------------------------------------------------------------
    def _conn(self) -> Connection:
        """The connection to the daemon; a new one when the last was lost (the daemon
        restarted): pins, mounts and reservations of the lost one are gone."""
        with self._lock:
            if self._closed:
                raise TensordError("this client is closed")
            conn = self._connection
            if conn is not None and not conn.alive():
                log.warning(
                    "lost the connection to the tensord daemon at %s (did it restart?); reconnecting: "
                    "pins, mounts and reservations made on the old connection are gone",
                    conn.where,
                )
                conn.close()
                conn = self._connection = None
            if conn is None:
                conn = self._connection = self._connect()
            return conn

    def _connect(self) -> Connection:
        return Connection(self.endpoint, timeout=self.timeout, identity=f"pid:{os.getpid()}", token=self.token)

    def _reconnect(self) -> Connection:
        """A new connection, waiting (up to `timeout`) for a daemon that is restarting."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pause = 0.05
        while True:
            if self._closed:
                raise TensordError("this client is closed")
            try:
                return self._connect()
            except Unavailable:
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _call_on(self, conn: Connection, lost: str, op: str, **args: Any) -> tuple[Any, list[int]]:
        """A request that only makes sense on `conn` (it concerns a pin or reservation made
        there): Unavailable with the message `lost` if that connection is gone."""
        if not conn.alive():
            conn.close()
            raise Unavailable(lost)
        try:
            return conn.call(op, **args)
        except Unavailable as exc:
            if conn.closed:
                raise Unavailable(lost) from exc
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection; the daemon releases every pin and reservation it held."""
        with self._lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self: C) -> C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- daemon-side loads --------------------------------------------------------------------
    def load_checkpoint(self, path: str, name: str, *, device: str = "cpu", threads: int | None = None) -> int:
        """Make the daemon load a .safetensors file or Hugging Face directory that it reads itself
        (it must lie under the daemon's ingest.allowed_roots). Returns the new version."""
        request = LoadRequest(os.path.abspath(path), check_name(name), device, threads)
        result, _ = self._conn().call("load", **request.to_wire())
        return LoadReply.from_wire(result, ProtocolError).version

    def load_passed(self, fds: list[int], **args: Any) -> dict[str, Any]:
        """Make the daemon load checkpoint files this process opened: `fds` are passed over the
        Unix socket (SCM_RIGHTS), `args` are the `load` op's (path, name, files describing each
        descriptor, device, threads, tp, rules). The reply: version, nbytes, sets."""
        result, _ = self._conn().call("load", pass_fds=fds, **args)
        return LoadReply.from_wire(result, ProtocolError).to_wire()

    # -- catalogue --------------------------------------------------------------------------
    def ls(self, prefix: str = "") -> list[dict[str, Any]]:
        """Sets whose name starts with `prefix`: name, latest, versions, nbytes, tensors, device."""
        result, _ = self._conn().call("ls", **LsRequest(check_prefix(prefix)).to_wire())
        return LsReply.from_wire(result, ProtocolError).to_wire()

    def info(self, name: str, version: int | str | None = None, *, tensors: bool = False) -> dict[str, Any]:
        """One version: tensor count and dtypes, bytes, device, pins, replicas, all versions;
        with `tensors`, also every tensor's dtype, shape and bytes: a read-only mapping name ->
        {dtype, shape, nbytes} (`TensorRows`) whose rows are built when looked at."""
        if not isinstance(tensors, bool):
            raise InvalidArgument(f"tensors must be True or False, not {tensors!r:.40}")
        request = InfoRequest(check_name(name), check_version(version), "columns" if tensors else False)
        result, _ = self._conn().call("info", **request.to_wire())
        out = InfoReply.from_wire(result, ProtocolError).to_wire()
        if tensors:  # columns, decoded in bulk; each row a dict only when looked at
            out["tensors"] = TensorRows(out.get("tensors"))
        return out

    def delete(self, name: str, version: int | None = None) -> int:
        """Delete one version, or every version of `name`. Idempotent: returns how many went."""
        from tensord_contract.messages import DeleteReply, DeleteRequest  # not on every command's start

        version = check_version(version, allow_latest=False)
        result, _ = self._conn().call("delete", **DeleteRequest(check_name(name), version).to_wire())
        return DeleteReply.from_wire(result, ProtocolError).deleted

    def status(self) -> dict[str, Any]:
        """The daemon: node, devices with budget and use, sets, pins, restore progress."""
        result, _ = self._conn().call("status", **StatusRequest().to_wire())
        return StatusReply.from_wire(result, ProtocolError).to_wire()

    def nodes(self) -> list[dict[str, Any]]:
        """Live nodes of the cluster: node record (devices and budgets) and current status."""
        result, _ = self._conn().call("nodes", **NodesRequest().to_wire())
        return NodesReply.from_wire(result, ProtocolError).to_wire()

    # -- cluster ----------------------------------------------------------------------------
    def replicate(
        self,
        name: str,
        version: int | str | None = None,
        *,
        to: str | list[str] | None = None,
        device: str | None = None,
        progress: Callable[[dict[str, float]], None] | None = None,
        rate: int | None = None,
        chunk: int | None = None,
    ) -> dict[str, Any]:
        """Make node `to` (default: this client's daemon) pull a copy of a version and
        advertise it as a replica; returns the node, version and device of the copy. `rate`:
        bytes/s each pull may read (default: the daemons' fleet.rate_limit; 0: no limit);
        `chunk`: bytes per chunk (default: their fleet.chunk_bytes).

        `to` a list of node ids, or "all" (every live node): they pull at the same time as one
        streamed fan-out (each serves the chunks it has to the others while it receives), and
        the call returns when every one holds a complete, checked replica: a dict with `nodes`
        (node -> device, seconds, bytes from each source) and `seconds`. Not all or nothing:
        when some fail it raises TransferError naming them (`details["failed"]`); the others
        keep their copies. `progress`: called about twice a second, from another thread, with
        {node: fraction of chunks held} for the nodes still pulling."""
        from tensord_contract.messages import FanOutReply, ReplicateReply, ReplicateRequest

        targets: str | tuple[str, ...] | None = to if not isinstance(to, list | tuple) else tuple(to)
        if isinstance(targets, tuple) and (not targets or not all(isinstance(n, str) for n in targets)):
            raise InvalidArgument("to must be a node id, a non-empty list of node ids, or 'all'")
        request = ReplicateRequest(check_name(name), check_version(version), device, targets, rate, chunk)
        if not request.fan_out:
            result, _ = self._conn().call("replicate", **request.to_wire())
            return ReplicateReply.from_wire(result, ProtocolError).to_wire()
        pinned = int(self.info(name, version)["version"])  # progress follows this one
        request = dataclasses.replace(request, version=pinned)
        stop = threading.Event()
        watcher = None
        if progress is not None:
            watcher = threading.Thread(target=self._progress, args=(name, pinned, progress, stop), daemon=True)
            watcher.start()
        conn = Connection(self.endpoint, timeout=None, identity=f"pid:{os.getpid()}", token=self.token)
        try:
            result, _ = conn.call("replicate", **request.to_wire())  # as long as the slowest node takes
        finally:
            conn.close()
            stop.set()
            if watcher is not None:
                watcher.join()
        return FanOutReply.from_wire(result, ProtocolError).to_wire()

    def _progress(
        self, name: str, version: int, report: Callable[[dict[str, float]], None], stop: threading.Event
    ) -> None:
        conn = self._connect()
        try:
            while not stop.wait(0.5):
                with contextlib.suppress(TensordError, OSError):
                    result, _ = conn.call("info", **InfoRequest(name, version).to_wire())
                    partials = InfoReply.from_wire(result, ProtocolError).partials
                    report({p.node: p.held / max(p.chunks, 1) for p in partials})
        finally:
            conn.close()

    def watch(self, name: str, *, after: int | None = None, timeout: float | None = None) -> Iterator[int]:
        """Yield each version of `name` committed after `after` (default: the current latest),
        in order, as it is committed. Stops after `timeout` seconds without one (None: never).

        Uses a connection of its own, so the client stays usable while a watch waits. When
        the daemon restarts, the watch reconnects (waiting up to the client's `timeout` for it)
        and goes on after the last version it yielded.
        """
        check_name(name)
        if after is not None and not is_int(after, 0, MAX_VERSION):
            raise InvalidArgument(f"after must be an integer from 0 to 2**63-1, not {type(after).__name__}")
        if timeout is not None and not is_number(timeout, 0, math.inf):
            raise InvalidArgument(f"timeout must be None or seconds (0 or more), not {timeout!r:.40}")
        if after is None:
            try:
                after = int(self.info(name)["latest"])
            except NotFound:
                after = 0
        conn = self._connect()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                left = _WATCH_POLL if deadline is None else deadline - time.monotonic()
                wait = max(0.0, min(_WATCH_POLL, left))  # long polls of at most _WATCH_POLL, up to the deadline
                try:
                    result, _ = conn.call("wait", **WaitRequest(name, after, wait).to_wire())
                except Unavailable:
                    if not conn.closed:  # the daemon answered (its registry is unreachable)
                        raise
                    log.warning("watch of %s lost the daemon at %s; reconnecting", name, conn.where)
                    conn = self._reconnect()
                    continue
                version = WaitReply.from_wire(result, ProtocolError).version
                if version is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    continue
                after = version
                yield after
                deadline = None if timeout is None else time.monotonic() + timeout
        finally:
            conn.close()
