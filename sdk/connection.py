"""One blocking control-plane connection to a daemon (Unix socket, file descriptors included).

The I/O driver over `tensord_contract.control`: it connects, sends the core's frames, reads
replies (with their descriptors) and maps socket failures to Unavailable."""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from sdk.settings import Settings
from tensord_contract import control, wire
from tensord_contract.defaults import DEFAULT_SOCKET
from tensord_contract.errors import InvalidArgument, ProtocolError, Unavailable
from tensord_contract.node_messages import HelloReply

log = logging.getLogger(__name__)


def endpoint(socket: str | None = None, address: str | None = None, settings: Settings | None = None) -> str:
    """Where to reach the daemon: "unix:PATH" or "tcp:HOST:PORT".

    An explicit socket or address wins; then TENSORD_ADDR (a daemon's TCP listener, for
    processes on nodes without a daemon); then TENSORD_SOCKET; then the default socket.
    """
    if socket is not None:
        return f"unix:{socket}"
    settings = settings if settings is not None else Settings.from_env()
    address = address if address is not None else settings.address
    if address:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"daemon address {address!r} is not host:port")
        return f"tcp:{address}"
    return f"unix:{settings.socket or DEFAULT_SOCKET}"


def _connect_unix(path: str, timeout: float | None) -> socket.socket:
    """Connect to a Unix socket, waiting up to `timeout` while the daemon's backlog is full.

    With a timeout the socket is non-blocking inside Python, and a non-blocking connect to a
    full backlog fails at once with EAGAIN (a blocking one would wait): many ranks starting
    together hit that, so it is retried with short pauses until the timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            if deadline is not None and time.monotonic() + pause > deadline:
                raise TimeoutError(errno.ETIMEDOUT, f"the daemon's backlog stayed full for {timeout} s") from exc
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class Connection:
    """Request/reply over one socket; thread-safe (one call at a time).

    A connection that failed (the daemon went away, a reply timed out) is closed for good:
    `closed` says so, and the Client replaces it on its next call."""

    def __init__(self, where: str, *, timeout: float | None, identity: str, token: str | None) -> None:
        self.where = where
        self.is_local = where.startswith("unix:")
        self.closed = False
        self._lock = threading.Lock()
        self._core = control.ClientProtocol()
        kind, _, target = where.partition(":")
        try:
            if kind == "unix":
                self._sock = _connect_unix(target, timeout)
            else:
                host, _, port = target.rpartition(":")
                self._sock = socket.create_connection((host, int(port)), timeout=timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise Unavailable(f"cannot reach the tensord daemon at {target}: {exc.strerror or exc}") from exc
        try:
            result, _ = self.call("hello", **control.hello_args(identity, token))
            #: what the daemon said of itself (`HelloReply`), as a map (`server.get("cluster")`)
            self.server = HelloReply.from_wire(result, ProtocolError).to_wire()
        except BaseException:
            self.close()
            raise

    def _request(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        if self.closed:
            raise Unavailable(f"the connection to the tensord daemon at {self.where} is closed")
        return self._core.request(op, args)

    def call(self, op: str, /, *, pass_fds: Sequence[int] = (), **args: Any) -> tuple[Any, list[int]]:
        """Send one request; return the result and any file descriptors that came with it.

        `pass_fds`: descriptors to hand the daemon with the request (Unix socket only; the
        daemon gets copies, these stay open)."""
        if pass_fds and not self.is_local:
            raise InvalidArgument(f"file descriptors cannot be passed to a daemon over TCP ({self.where})")
        with self._lock:
            request_id, frame = self._request(op, args)
            try:
                if pass_fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", pass_fds).tobytes())]
                    frame = frame[self._sock.sendmsg([frame], ancillary) :]
                self._sock.sendall(frame)
                while True:
                    fds: list[int] = []
                    reply = wire.decode(self._recv_frame(fds))
                    if not self._core.late(reply):
                        break
                    _close_all(fds)  # the answer to an earlier post()
                    if not reply.get("ok"):
                        log.warning("an earlier request failed: %s", reply.get("error"))
            except (OSError, TimeoutError) as exc:
                self.close()
                raise Unavailable(f"lost the tensord daemon at {self.where}: {exc}") from exc
        try:
            self._core.check(reply, request_id, op, len(fds))
            return self._core.result(reply), fds
        except BaseException:
            _close_all(fds)
            raise

    def post(self, op: str, **args: Any) -> None:
        """Send a request without waiting: its reply is read (and dropped) by the next call."""
        with self._lock:
            request_id, frame = self._request(op, args)
            try:
                self._sock.sendall(frame)
            except OSError as exc:
                self.close()
                raise Unavailable(f"lost the tensord daemon at {self.where}: {exc}") from exc
            self._core.posted(request_id)

    def _recv_frame(self, fds: list[int]) -> bytearray:
        """One frame's body, read no further than its end: descriptors ride on the first bytes of
        a reply, so they land in `fds` with the frame they belong to."""
        frames = control.FrameReader()
        while (body := frames.next()) is None:
            data, ancillary, flags, _ = self._sock.recvmsg(
                frames.wanted, socket.CMSG_SPACE(wire.MAX_FDS * array.array("i").itemsize)
            )
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if flags & socket.MSG_CTRUNC:
                _close_all(fds)
                raise ProtocolError("file descriptors were truncated")
            if not data:
                raise ConnectionResetError("the daemon closed the connection")
            frames.feed(data)
        return body

    def alive(self) -> bool:
        """False once the daemon closed its end (it exited or restarted): a cheap check,
        without waiting, made before each use so a restarted daemon is noticed in time.
        The poll's POLLRDHUP says so without reading: a peek could wait out the socket's
        timeout, holding the client's lock, when another thread read the replies in between
        (CPython waits for data on a socket with a timeout even with MSG_DONTWAIT)."""
        if self.closed:
            return False
        try:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN | _RDHUP)
            events = poller.poll(0)
        except (OSError, ValueError):  # closed meanwhile by a failing call on another thread
            return False
        if not events:
            return True
        if events[0][1] & (select.POLLERR | select.POLLNVAL | select.POLLHUP | _RDHUP):
            return False
        if _RDHUP:  # readable, not closed: replies to posted requests waiting to be read
            return True
        try:  # no POLLRDHUP here: end of stream, or replies waiting
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.closed = True
        self._sock.close()


_RDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer closed its end


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
