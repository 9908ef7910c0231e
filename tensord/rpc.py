"""The control-plane server, an asyncio driver over `tensord_contract.control` (frames, request
checks, error replies): Unix socket and TCP listeners, one session per connection.

A session owns the pins and reservations its client made; they are released when the
connection closes, however it closes (process exit, SIGKILL, network loss). A bad frame gets an
error reply (or a closed connection when the stream cannot be trusted any more) and never
touches the store or another client.

What a connection may cost before it is trusted is bounded: frames of at most
`control.frame_limit(False)` bytes until a hello (and, on a TCP listener with a token, the token)
succeeds, a hello within `hello_timeout` seconds, `MAX_FAILED_HELLOS` failed hellos. A frame
once started must arrive, and a reply once started must be read, within `frame_timeout`.
Between frames a trusted connection may stay idle for ever: pins belong to connections.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import hmac
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tensord.pins import Pin
from tensord_contract import control, wire
from tensord_contract.control import brief
from tensord_contract.errors import InvalidArgument, OutOfCapacity, ProtocolError, TensordError, Unauthorized

log = logging.getLogger(__name__)

#: Pending connections the kernel queues for each listener (it caps this at net.core.somaxconn).
BACKLOG = 4096
#: Failed hellos (wrong token, wrong protocol) after which a connection is closed.
MAX_FAILED_HELLOS = 3
#: Frames from this size on are decoded, and their replies encoded, off the event loop.
OFFLOAD_BYTES = 1 << 20
#: Errors of accept() that a listener survives by waiting: out of descriptors or memory
#: (EMFILE, ENFILE, ENOBUFS, ENOMEM), or a peer that left before it was accepted.
_ACCEPT_BACKOFF = (0.01, 1.0)
_FD_ERRORS = (errno.EMFILE, errno.ENFILE)
_CAPACITY_ERRORS = (*_FD_ERRORS, errno.ENOMEM, errno.ENOSPC)


@dataclass(eq=False)
class Session:
    id: int
    peer: str = ""
    local: bool = True  # on the Unix socket (same node): may receive file descriptors
    authorized: bool = False  # presented the right token (TCP only)
    hello: bool = False
    failed_hellos: int = 0
    deadline: float = math.inf  # loop time by which the peer must have made progress
    hello_by: float = math.inf  # loop time by which its hello must have succeeded
    pins: dict[int, Pin] = field(default_factory=dict)  # pin id -> what it holds
    reservations: set[int] = field(default_factory=set)
    published: dict[tuple[str, int], Any] = field(default_factory=dict)  # (name, version) -> held
    #: descriptors passed with the request being handled (Unix socket only); an op takes what it
    #: uses, the server closes the rest after the reply
    passed: list[int] = field(default_factory=list)
    outcome: tuple[str, str] = ("", "")  # (op, "ok" or error code) of the last request: metrics
    fd: int = -1  # the connection's socket, for an op that waits to see it closed (`ops.base.unless_gone`)


Handler = Callable[[Session, dict[str, Any]], Awaitable[tuple[Any, list[int]]]]
#: Called when a handler succeeded but its reply could not be sent: give back what it took.
Undo = Callable[[Session, str, Any], Awaitable[None]]


class Server:
    """Accepts connections on a Unix socket (and optionally TCP) and feeds requests to `handle`.

    On TCP, a listener with a token refuses every mutating op and every daemon-to-daemon op
    (`wire.PEER`; with `token_reads`, every op) to a connection whose hello did not carry that
    token. The Unix socket is trusted: its file mode is the boundary.
    """

    def __init__(
        self,
        path: str,
        mode: int,
        handle: Handler,
        on_close: Callable[[Session], Awaitable[None]],
        *,
        undo: Undo | None = None,
        tcp: str = "",
        token: str = "",
        token_reads: bool = False,
        hello_timeout: float = 10.0,
        frame_timeout: float = 60.0,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """`observe(op, code, seconds)`: called once per answered request ("ok" or the error
        code; op "" when the frame named no valid op), for metrics."""
        self.path, self.mode, self.tcp = path, mode, tcp
        self._observe = observe
        self._token, self._token_reads = token, token_reads
        self._handle, self._on_close, self._undo = handle, on_close, undo
        self.hello_timeout, self.frame_timeout = hello_timeout, frame_timeout
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: list[asyncio.Task[None]] = []
        self._open: dict[int, tuple[Session, socket.socket]] = {}
        self._bugs: dict[tuple[str, str], int] = {}  # where an internal error happened -> times
        self._next = 0
        self.tcp_port = 0

    async def start(self) -> None:
        _remove_stale_socket(self.path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(self.path)
        os.chmod(self.path, self.mode)
        self._listen(unix, local=True)
        log.info("listening on %s (mode %o)", self.path, self.mode)
        if self.tcp:
            host, _, port = self.tcp.rpartition(":")
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((host, int(port)))
            except OSError as exc:
                tcp.close()
                raise InvalidArgument(f"cannot listen on {self.tcp}: {exc.strerror}") from exc
            self.tcp_port = tcp.getsockname()[1]
            self._listen(tcp, local=False)
            log.info(
                "listening on tcp %s:%d (token %s)",
                host,
                self.tcp_port,
                "required" if self._token else "NOT required: anyone who reaches it can write",
            )
        self._accepting.append(asyncio.get_running_loop().create_task(self._sweep()))

    def _listen(self, sock: socket.socket, *, local: bool) -> None:
        sock.setblocking(False)
        sock.listen(BACKLOG)
        self._listeners.append(sock)
        self._accepting.append(asyncio.get_running_loop().create_task(self._accept(sock, local)))

    async def _accept(self, listener: socket.socket, local: bool) -> None:
        """Accept for ever. An error (out of descriptors, a peer gone before it was accepted) is
        logged and waited out with a growing pause: the connections wait in the backlog."""
        loop = asyncio.get_running_loop()
        pause, failures, logged = 0.0, 0, 0.0
        while True:
            try:
                conn, address = await loop.sock_accept(listener)
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    log.error("listener %s is gone: %s", listener, exc)
                    return
                failures += 1
                pause = min(max(pause * 2, _ACCEPT_BACKOFF[0]), _ACCEPT_BACKOFF[1])
                if time.monotonic() - logged > 10:
                    logged = time.monotonic()
                    hint = " (raise LimitNOFILE / ulimit -n)" if exc.errno in _FD_ERRORS else ""
                    log.warning("accept failed %d times: %s%s; retrying", failures, exc.strerror or exc, hint)
                await asyncio.sleep(pause)
                continue
            if failures:
                log.info("accepting again after %d failed attempts", failures)
                pause, failures, logged = 0.0, 0, 0.0
            try:
                conn.setblocking(False)
                if not local:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._next += 1
                peer = _peer(conn) if local else f"{address[0]}:{address[1]}"
            except OSError as exc:  # the peer left already
                log.debug("connection dropped while accepting it: %s", exc)
                conn.close()
                continue
            task = loop.create_task(self._serve(conn, Session(self._next, peer, local=local, fd=conn.fileno())))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _sweep(self) -> None:
        """Close connections past their deadline: no hello in time, a frame or reply stalled."""
        while True:
            await asyncio.sleep(max(0.05, min(self.hello_timeout, self.frame_timeout) / 4))
            now = asyncio.get_running_loop().time()
            for session, conn in list(self._open.values()):
                if session.deadline < now:
                    session.deadline = math.inf
                    log.info(
                        "session %d (%s) timed out: %s",
                        session.id,
                        session.peer,
                        "a frame or reply stalled" if session.hello else "no hello in time",
                    )
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)

    def _trusted(self, session: Session) -> bool:
        return session.hello and (session.local or not self._token or session.authorized)

    def _expect(self, session: Session, seconds: float | None) -> None:
        """The peer must make progress within `seconds` (None: nothing is expected of it), and
        say hello by its hello deadline."""
        deadline = math.inf if seconds is None else asyncio.get_running_loop().time() + seconds
        session.deadline = deadline if session.hello else min(deadline, session.hello_by)

    async def _serve(self, conn: socket.socket, session: Session) -> None:
        loop = asyncio.get_running_loop()
        log.debug("session %d opened by %s", session.id, session.peer)
        session.hello_by = session.deadline = loop.time() + self.hello_timeout
        self._open[session.id] = (session, conn)
        frames = control.FrameReader()
        try:
            while True:
                frames.limit = control.frame_limit(self._trusted(session))
                try:
                    body = await self._read(conn, session, frames)
                except ProtocolError as exc:
                    self._expect(session, self.frame_timeout)
                    await _send(loop, conn, control.error_frame(None, exc), [])
                    return  # the stream cannot be resynchronised
                if body is None:
                    return
                session.deadline = math.inf  # the daemon's turn, however long the op takes
                started = time.perf_counter()
                try:
                    data, fds, close = await self._dispatch(session, body)
                finally:
                    _close_passed(session)
                if self._observe is not None:
                    self._observe(*session.outcome, time.perf_counter() - started)
                self._expect(session, self.frame_timeout)
                await _send(loop, conn, data, fds)
                self._expect(session, None)
                if close:
                    log.info("session %d (%s): %d failed hellos, closing", session.id, session.peer, MAX_FAILED_HELLOS)
                    return
        except (ConnectionError, OSError) as exc:
            log.debug("session %d: %s", session.id, exc)
        finally:
            self._open.pop(session.id, None)
            _close_passed(session)
            conn.close()
            await self._on_close(session)
            log.debug("session %d closed", session.id)

    async def _read(self, conn: socket.socket, session: Session, frames: control.FrameReader) -> bytearray | None:
        """The next frame's body (due within `frame_timeout` once its header is in), or None at
        a clean end of stream."""
        while (body := frames.next()) is None:
            if session.local:
                chunk = await _recv_with_fds(conn, min(frames.wanted, 1 << 20), session.passed)
            else:
                chunk = await asyncio.get_running_loop().sock_recv(conn, min(frames.wanted, 1 << 20))
            if not chunk:
                if frames.inside:
                    raise ConnectionResetError("connection closed inside a frame")
                return None
            in_header = frames.in_header
            frames.feed(chunk)
            if in_header and not frames.in_header:
                self._expect(session, self.frame_timeout)
        return body

    async def _dispatch(self, session: Session, body: bytearray) -> tuple[bytes, list[int], bool]:
        """Decode, check, handle and encode one request: the reply's bytes, the descriptors to
        pass with them, and whether to close the connection afterwards."""
        request_id: object = None
        op: Any = ""
        big = len(body) >= OFFLOAD_BYTES
        session.outcome = ("", "protocol_error")
        try:
            request = await asyncio.to_thread(wire.decode, body) if big else wire.decode(body)
            request_id, op = control.request_id(request), request.get("op")
            op, args = control.check_request(request, hello=session.hello)
            self._authorize(session, op, args)
            result, fds = await self._handle(session, {"op": op, **args})
            reply: dict[str, Any] = {"id": request_id, "ok": True, "result": result, "fds": len(fds)}
        except (TensordError, RecursionError) as exc:
            bad = exc if isinstance(exc, TensordError) else InvalidArgument("the request nests too deeply")
            return self._error(session, op, request_id, bad), [], self._hello_failed(session, op)
        except OSError as exc:
            return self._error(session, op, request_id, self._os_error(session, op, exc)), [], False
        except Exception as exc:  # a bug: report it, keep serving
            return self._error(session, op, request_id, self._bug(session, op, exc)), [], False
        try:
            data = await asyncio.to_thread(wire.encode, reply) if big else wire.encode(reply)
        except Exception as exc:  # too large for a frame, or something msgpack cannot hold
            if self._undo is not None:
                await self._undo(session, op, result)
            if isinstance(exc, ProtocolError):  # the frame limit
                error: TensordError = InvalidArgument(f"{op}: the reply would exceed the frame limit: {exc.message}")
            else:
                error = self._bug(session, op, exc)
            return self._error(session, op, request_id, error), [], False
        session.outcome = (op, "ok")
        return data, fds, False

    def _hello_failed(self, session: Session, op: str) -> bool:
        """Count a failed hello; True when the connection has had too many."""
        if op != "hello":
            return False
        session.failed_hellos += 1
        return session.failed_hellos >= MAX_FAILED_HELLOS

    def _error(self, session: Session, op: object, request_id: object, exc: TensordError) -> bytes:
        session.outcome = (op if isinstance(op, str) and op in wire.OPS else "", exc.code)
        return control.error_frame(request_id, exc)

    def _os_error(self, session: Session, op: str, exc: OSError) -> TensordError:
        if exc.errno in _FD_ERRORS:
            return OutOfCapacity(
                f"{op}: the daemon is out of file descriptors ({exc.strerror}); each held host-memory "
                "version keeps one open: raise its limit (LimitNOFILE) or hold fewer versions"
            )
        if exc.errno in _CAPACITY_ERRORS:
            return OutOfCapacity(f"{op}: {exc.strerror}")
        return self._bug(session, op, exc)

    def _bug(self, session: Session, op: str, exc: BaseException) -> TensordError:
        """Log an internal error (the traceback once per place, then one line) and wrap it."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
        key = (type(exc).__name__, where)
        self._bugs[key] = seen = self._bugs.get(key, 0) + 1
        if seen == 1:
            log.error("internal error in %s (session %d)", op or "a request", session.id, exc_info=exc)
        else:
            log.error("internal error in %s (session %d): %s at %s (%d times)", op, session.id, key[0], where, seen)
        return TensordError(f"internal error: {type(exc).__name__}: {brief(str(exc))}")

    def _authorize(self, session: Session, op: str, args: dict[str, Any]) -> None:
        if op == "hello":
            token = args.get("token")
            if token is not None and self._token:
                if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self._token.encode()):
                    raise Unauthorized("wrong token")
                session.authorized = True
            return
        if session.local or not self._token or session.authorized:
            return
        if op in wire.MUTATING or op in wire.PEER or self._token_reads:
            raise Unauthorized(f"{op} over TCP needs the daemon's token (TENSORD_TOKEN)")

    async def close(self) -> None:
        """Stop accepting, then close every connection (their sessions release what they held)."""
        for task in self._accepting:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._accepting.clear()
        if self._listeners:
            for sock in self._listeners:
                sock.close()
            self._listeners.clear()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, data: bytes, fds: list[int]) -> None:
    if fds:
        # Descriptors ride on the first bytes; replies are small and the client is waiting.
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        for _ in range(1000):
            try:
                sent = conn.sendmsg([data], ancillary)
                break
            except BlockingIOError:
                await asyncio.sleep(0.001)
        else:
            raise ConnectionError("client does not read its replies")
        data = data[sent:]
    if data:
        await loop.sock_sendall(conn, data)


async def _recv_with_fds(conn: socket.socket, size: int, fds: list[int]) -> bytes:
    """Up to `size` bytes from a Unix socket, adding any descriptors passed with them to `fds`
    (at most `wire.MAX_PASSED_FDS` per request: more is a protocol error)."""
    loop = asyncio.get_running_loop()
    space = socket.CMSG_SPACE(wire.MAX_PASSED_FDS * array.array("i").itemsize)
    while True:
        try:
            data, ancillary, flags, _ = conn.recvmsg(size, space)
            break
        except (BlockingIOError, InterruptedError):
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    if flags & socket.MSG_CTRUNC or len(fds) > wire.MAX_PASSED_FDS:
        raise ProtocolError(f"more than {wire.MAX_PASSED_FDS} file descriptors passed with one request")
    return data


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _close_passed(session: Session) -> None:
    while session.passed:
        with contextlib.suppress(OSError):
            os.close(session.passed.pop())


def _peer(conn: socket.socket) -> str:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid, uid, _ = array.array("i", creds)
        return f"pid {pid} uid {uid}"
    except OSError:
        return "unknown"


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by a dead daemon; refuse to start over a live one or a non-socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise InvalidArgument(f"another daemon is listening on {path}")
