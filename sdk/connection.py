"""One blocking control-plane connection to a daemon (Unix socket, file descriptors included)."""

from __future__ import annotations

import array
import itertools
import logging
import os
import socket
import threading
from typing import Any

from sdk import wire
from sdk.errors import InvalidArgument, ProtocolError, Unavailable, from_wire

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/tensord/tensord.sock"


def endpoint(socket: str | None = None, address: str | None = None) -> str:
    """Where to reach the daemon: "unix:PATH" or "tcp:HOST:PORT".

    An explicit socket or address wins; then TENSORD_ADDR (a daemon's TCP listener, for
    processes on nodes without a daemon); then TENSORD_SOCKET; then the default socket.
    """
    if socket is not None:
        return f"unix:{socket}"
    address = address if address is not None else os.environ.get("TENSORD_ADDR")
    if address:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"daemon address {address!r} is not host:port")
        return f"tcp:{address}"
    return f"unix:{os.environ.get('TENSORD_SOCKET') or DEFAULT_SOCKET}"


class Connection:
    """Request/reply over one socket; thread-safe (one call at a time)."""

    def __init__(self, where: str, *, timeout: float | None, identity: str, token: str | None) -> None:
        self.where = where
        self.is_local = where.startswith("unix:")
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._posted: set[int] = set()
        kind, _, target = where.partition(":")
        try:
            if kind == "unix":
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                try:
                    self._sock.connect(target)
                except OSError:
                    self._sock.close()
                    raise
            else:
                host, _, port = target.rpartition(":")
                self._sock = socket.create_connection((host, int(port)), timeout=timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise Unavailable(f"cannot reach the tensord daemon at {target}: {exc.strerror or exc}") from exc
        hello: dict[str, Any] = {"protocol": wire.PROTOCOL_VERSION, "client": identity}
        if token:
            hello["token"] = token
        try:
            self.server = self.call("hello", **hello)[0]
        except BaseException:
            self.close()
            raise

    def call(self, op: str, **args: Any) -> tuple[Any, list[int]]:
        """Send one request; return the result and any file descriptors that came with it."""
        with self._lock:
            request_id = next(self._ids)
            try:
                self._sock.sendall(wire.encode({"id": request_id, "op": op, "args": args}))
                while True:
                    fds: list[int] = []
                    length = wire.frame_length(self._recv(wire.HEADER.size, fds))
                    reply = wire.decode(self._recv(length, fds))
                    if reply.get("id") not in self._posted:
                        break
                    self._posted.discard(reply.get("id"))  # the answer to an earlier post()
                    _close_all(fds)
                    if not reply.get("ok"):
                        log.warning("an earlier request failed: %s", reply.get("error"))
            except (OSError, TimeoutError) as exc:
                self.close()
                raise Unavailable(f"lost the tensord daemon at {self.where}: {exc}") from exc
        if reply.get("id") != request_id or len(fds) != reply.get("fds", 0):
            _close_all(fds)
            raise ProtocolError(f"reply does not match request {request_id} ({op})")
        if not reply.get("ok"):
            _close_all(fds)
            raise from_wire(reply.get("error"))
        return reply.get("result"), fds

    def post(self, op: str, **args: Any) -> None:
        """Send a request without waiting: its reply is read (and dropped) by the next call."""
        with self._lock:
            request_id = next(self._ids)
            try:
                self._sock.sendall(wire.encode({"id": request_id, "op": op, "args": args}))
            except OSError as exc:
                self.close()
                raise Unavailable(f"lost the tensord daemon at {self.where}: {exc}") from exc
            self._posted.add(request_id)

    def _recv(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data, ancillary, flags, _ = self._sock.recvmsg(
                n - len(buf), socket.CMSG_SPACE(wire.MAX_FDS * array.array("i").itemsize)
            )
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise ProtocolError("file descriptors were truncated")
            if not data:
                raise ConnectionResetError("the daemon closed the connection")
            buf += data
        return bytes(buf)

    def close(self) -> None:
        self._sock.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
