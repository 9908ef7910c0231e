"""The control plane without I/O: what to send, and what a received frame means.

Three drivers move the bytes: `sdk.connection` (blocking sockets, file descriptors),
`tensord.peers` (asyncio streams, daemon to daemon) and `tensord.rpc` (the daemon's server).
This core does the rest, the same for all of them: it cuts a byte stream into frames within a
size limit (`FrameReader`), allocates request ids and builds request frames, the hello among
them, and turns a reply into a result or the `TensordError` it carries (`ClientProtocol`); on
the server side it checks a request's shape (`check_request`) and builds an error reply that can
always be sent (`error_frame`). No sockets, no event loop, no threads: the drivers own those
(and the locking: a `ClientProtocol` serves one call at a time).
"""

from __future__ import annotations

import itertools
import reprlib
from typing import Any

from tensord_contract import wire
from tensord_contract.errors import InvalidArgument, ProtocolError, TensordError, from_wire
from tensord_contract.node_messages import HelloRequest

_brief = reprlib.Repr()
_brief.maxlevel, _brief.maxstring, _brief.maxother, _brief.maxlist, _brief.maxdict = 2, 40, 40, 4, 4


def brief(value: object) -> str:
    """A short repr of a value from outside, safe for any size or depth."""
    return _brief.repr(value)


def frame_limit(trusted: bool) -> int:
    """The largest frame a daemon reads: small until the connection is trusted (a hello, and on
    a TCP listener with a token, the token), so an unknown peer costs little memory."""
    return wire.MAX_FRAME if trusted else wire.MAX_UNTRUSTED_FRAME


class FrameReader:
    """Cuts a byte stream into frame bodies: `feed` what arrived, take whole frames with `next`.

    `wanted` says how many bytes finish the header or body being read; a driver that reads no
    more than that never takes bytes (or, on a Unix socket, descriptors) of the next frame. A
    header announcing more than `limit` bytes raises ProtocolError: the stream cannot be
    resynchronised after it. The body buffer grows with what arrives, so a peer that announces a
    large frame and stalls costs little."""

    def __init__(self, limit: int = wire.MAX_FRAME) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._length: int | None = None  # of the frame whose body is in _buf

    @property
    def wanted(self) -> int:
        if self._length is None:
            return max(0, wire.HEADER.size - len(self._buf))
        return max(0, self._length - len(self._buf))

    @property
    def in_header(self) -> bool:
        """True while the next frame's header is incomplete."""
        return self._length is None

    @property
    def inside(self) -> bool:
        """True when part of a frame has arrived: an end of stream now cuts a frame short."""
        return self._length is not None or bool(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        self._header()

    def next(self) -> bytearray | None:
        """The body of the next whole frame, or None until it has arrived."""
        if self._length is None or len(self._buf) < self._length:
            return None
        if len(self._buf) == self._length:
            body, self._buf = self._buf, bytearray()
        else:
            body = self._buf[: self._length]
            del self._buf[: self._length]
        self._length = None
        self._header()
        return body

    def _header(self) -> None:
        if self._length is None and len(self._buf) >= wire.HEADER.size:
            length = wire.frame_length(self._buf[: wire.HEADER.size], self.limit)
            del self._buf[: wire.HEADER.size]
            self._length = length


def hello_args(identity: str, token: str | None) -> dict[str, Any]:
    """The arguments of the first request on a connection: protocol version, who is asking, and
    the token when there is one (a TCP listener with a token wants it for mutating ops)."""
    return HelloRequest(wire.PROTOCOL_VERSION, identity, token or None).to_wire()


class ClientProtocol:
    """The client side of one control-plane connection: request ids, request frames, replies.

    A driver sends `request(...)`'s bytes, reads frames until one is not `late` (the answer to
    a request sent without waiting), and gets the outcome from `check` (does the reply answer
    this request, with the descriptors it announces?) and `result` (the value, or the error)."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._posted: set[int] = set()

    def request(self, op: str, args: dict[str, Any]) -> tuple[int, bytes]:
        """A new request id and the frame that carries `{id, op, args}`."""
        request_id = next(self._ids)
        try:
            return request_id, wire.encode({"id": request_id, "op": op, "args": args})
        except (OverflowError, TypeError, ValueError) as exc:  # what msgpack cannot hold
            raise InvalidArgument(f"{op}: an argument cannot be sent: {exc}") from exc

    def hello(self, identity: str, token: str | None) -> tuple[int, bytes]:
        return self.request("hello", hello_args(identity, token))

    def posted(self, request_id: int) -> None:
        """Request `request_id` was sent without waiting: `late` recognises its reply."""
        self._posted.add(request_id)

    def late(self, reply: dict[str, Any]) -> bool:
        """True for the reply to a request sent without waiting (now forgotten): drop it."""
        request_id = reply.get("id")
        if request_id not in self._posted:
            return False
        self._posted.discard(request_id)
        return True

    @staticmethod
    def check(reply: dict[str, Any], request_id: int, op: str, fds: int = 0) -> None:
        """ProtocolError unless `reply` answers request `request_id` and came with the number of
        descriptors it announces."""
        if reply.get("id") != request_id or fds != reply.get("fds", 0):
            raise ProtocolError(f"reply does not match request {request_id} ({op})")

    @staticmethod
    def result(reply: dict[str, Any]) -> Any:
        """The result of a successful reply; the error a failed one carries, raised."""
        if not reply.get("ok"):
            raise from_wire(reply.get("error"))
        return reply.get("result")


def request_id(request: dict[str, Any]) -> int | None:
    """The id a reply to `request` carries: None when the request has no integer id."""
    rid = request.get("id")
    return rid if type(rid) is int else None


def check_request(request: dict[str, Any], *, hello: bool = True) -> tuple[str, dict[str, Any]]:
    """The op and arguments of a decoded request, checked for shape (not for meaning): a broken
    id or op breaks the protocol, and so does any op but hello before a hello succeeded (`hello`
    False); an unknown op or bad arguments are invalid."""
    op, args = request.get("op"), request.get("args", {})
    if request_id(request) is None:
        raise ProtocolError("request id must be an integer")
    if not isinstance(op, str):
        raise ProtocolError(f"op must be a string, not {type(op).__name__}")
    if op not in wire.OPS:
        raise InvalidArgument(f"unknown op {brief(op)}")
    if not isinstance(args, dict):
        raise InvalidArgument("args must be a map")
    if not all(type(k) is str for k in args):
        raise InvalidArgument("argument names must be strings")
    if "op" in args:
        raise InvalidArgument("'op' is not an argument")
    if not hello and op != "hello":
        raise ProtocolError("the first request must be hello")
    return op, args


def error_frame(request_id: object, exc: TensordError) -> bytes:
    """An error reply that can always be sent: details msgpack cannot hold (an integer of 2**64
    or more, say) are dropped, then the message is shortened."""
    error = exc.to_wire()
    for reply in (
        {"id": request_id, "ok": False, "error": error},
        {"id": request_id, "ok": False, "error": {**error, "details": {}}},
        {"id": request_id, "ok": False, "error": {"code": exc.code, "message": exc.message[:200], "details": {}}},
    ):
        try:
            return wire.encode(reply)
        except Exception:  # noqa: S112 - try the next, plainer form
            continue
    return wire.encode({"id": None, "ok": False, "error": {"code": exc.code, "message": "", "details": {}}})
