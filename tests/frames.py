"""A hand-driven control-plane connection, to send what the SDK never would."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import msgpack

from tensord_contract import wire


class Raw:
    """One connection to a daemon's Unix socket (or, with `tcp`, its TCP listener)."""

    def __init__(self, path: str = "", hello: bool = True, *, tcp: tuple[str, int] | None = None) -> None:
        if tcp is not None:
            self.sock = socket.create_connection(tcp, timeout=10)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(path)
        if hello:
            assert self.call("hello", protocol=wire.PROTOCOL_VERSION)["ok"]

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: Any) -> None:
        body = msgpack.packb(message)
        self.send_bytes(struct.pack(">I", len(body)) + body)

    def recv(self) -> dict[str, Any] | None:
        """The next reply, or None when the daemon closed the connection."""
        header = self._exact(4)
        if header is None:
            return None
        (n,) = struct.unpack(">I", header)
        body = self._exact(n)
        assert body is not None
        return msgpack.unpackb(body)

    def _exact(self, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.send({"id": 1, "op": op, "args": args})
        reply = self.recv()
        assert reply is not None
        return reply

    def close(self) -> None:
        self.sock.close()


def code(reply: dict[str, Any] | None) -> str:
    """The error code of a failed reply."""
    assert reply is not None and reply["ok"] is False, reply
    return str(reply["error"]["code"])


def log_clean(log: Path) -> None:
    """A daemon's log shows no traceback and no internal error."""
    text = log.read_text()
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
