"""The control-plane server: msgpack frames over a Unix socket, one session per connection.

A session owns the pins and reservations its client made; they are released when the
connection closes, however it closes (process exit, SIGKILL, network loss). A bad frame gets an
error reply (or a closed connection when the stream cannot be trusted any more) and never
touches the store or another client.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import hmac
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sdk import wire
from sdk.errors import InvalidArgument, ProtocolError, TensordError, Unauthorized

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Session:
    id: int
    peer: str = ""
    local: bool = True  # on the Unix socket (same node): may receive file descriptors
    authorized: bool = False  # presented the right token (TCP only)
    hello: bool = False
    pins: dict[int, Any] = field(default_factory=dict)  # pin id -> held version
    reservations: set[int] = field(default_factory=set)


Handler = Callable[[Session, dict[str, Any]], Awaitable[tuple[Any, list[int]]]]


class Server:
    """Accepts connections on a Unix socket (and optionally TCP) and feeds requests to `handle`.

    On TCP, a listener with a token refuses every mutating op (and, with `token_reads`, every
    op) to a connection whose hello did not carry that token. The Unix socket is trusted: its
    file mode is the boundary.
    """

    def __init__(
        self,
        path: str,
        mode: int,
        handle: Handler,
        on_close: Callable[[Session], Awaitable[None]],
        *,
        tcp: str = "",
        token: str = "",
        token_reads: bool = False,
    ) -> None:
        self.path, self.mode, self.tcp = path, mode, tcp
        self._token, self._token_reads = token, token_reads
        self._handle, self._on_close = handle, on_close
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: list[asyncio.Task[None]] = []
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

    def _listen(self, sock: socket.socket, *, local: bool) -> None:
        sock.setblocking(False)
        sock.listen(128)
        self._listeners.append(sock)
        self._accepting.append(asyncio.get_running_loop().create_task(self._accept(sock, local)))

    async def _accept(self, listener: socket.socket, local: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, address = await loop.sock_accept(listener)
            conn.setblocking(False)
            if not local:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._next += 1
            peer = _peer(conn) if local else f"{address[0]}:{address[1]}"
            task = loop.create_task(self._serve(conn, Session(self._next, peer, local=local)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, session: Session) -> None:
        loop = asyncio.get_running_loop()
        log.debug("session %d opened by %s", session.id, session.peer)
        try:
            while True:
                header = await _recv_exact(loop, conn, wire.HEADER.size)
                if header is None:
                    return
                try:
                    length = wire.frame_length(header)
                except ProtocolError as exc:
                    await _send(loop, conn, {"id": None, "ok": False, "error": exc.to_wire()}, [])
                    return  # the stream cannot be resynchronised
                body = await _recv_exact(loop, conn, length)
                if body is None:
                    return
                reply, fds = await self._dispatch(session, body)
                await _send(loop, conn, reply, fds)
        except (ConnectionError, OSError) as exc:
            log.debug("session %d: %s", session.id, exc)
        finally:
            conn.close()
            await self._on_close(session)
            log.debug("session %d closed", session.id)

    async def _dispatch(self, session: Session, body: bytes) -> tuple[dict[str, Any], list[int]]:
        request_id = None
        try:
            request = wire.decode(body)
            request_id = request.get("id")
            op, args = request.get("op"), request.get("args", {})
            if not isinstance(request_id, int) or isinstance(request_id, bool):
                raise ProtocolError("request id must be an integer")
            if op not in wire.OPS:
                raise InvalidArgument(f"unknown op {op!r:.40}")
            if not isinstance(args, dict):
                raise InvalidArgument("args must be a map")
            if not session.hello and op != "hello":
                raise ProtocolError("the first request must be hello")
            self._authorize(session, op, args)
            result, fds = await self._handle(session, {"op": op, **args})
            return {"id": request_id, "ok": True, "result": result, "fds": len(fds)}, fds
        except TensordError as exc:
            return {"id": request_id, "ok": False, "error": exc.to_wire()}, []
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("internal error in session %d", session.id)
            error = TensordError(f"internal error: {type(exc).__name__}: {exc}")
            return {"id": request_id, "ok": False, "error": error.to_wire()}, []

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
        if op in wire.MUTATING or self._token_reads:
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


async def _recv_exact(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes | None:
    """n bytes, or None at a clean end of stream before the first byte."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(conn, min(n - len(buf), 1 << 20))
        if not chunk:
            if buf:
                raise ConnectionResetError("connection closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)


async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, reply: dict[str, Any], fds: list[int]) -> None:
    try:
        data = wire.encode(reply)
    except ProtocolError as exc:
        data = wire.encode({"id": reply.get("id"), "ok": False, "error": exc.to_wire()})
        fds = []
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
