"""The control-plane wire format, shared by the SDK and the daemon.

A frame is a 4-byte big-endian length followed by one msgpack map.
Request ``{id, op, args}``; reply ``{id, ok: true, result}`` or
``{id, ok: false, error: {code, message, details}}``. On a Unix socket a reply may carry
file descriptors (SCM_RIGHTS) for shared-memory slabs; the reply's ``fds`` key counts them.
A request may pass descriptors too (a `load` of files the caller opened; its ``files`` lists them).
What a client or server does with frames (ids, hello, limits, replies) is in `control`.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from tensord_contract.errors import ProtocolError

PROTOCOL_VERSION = 2
MAX_FRAME = 64 * 1024 * 1024
#: The largest frame a daemon reads from a connection it does not trust yet: before a
#: successful hello, and on a TCP listener with a token before the token was shown.
MAX_UNTRUSTED_FRAME = 64 * 1024
HEADER = struct.Struct(">I")
MAX_FDS = 16
#: Descriptors a request may pass to the daemon (a `load` of checkpoint files the caller opened):
#: the kernel's limit for one message (SCM_MAX_FD).
MAX_PASSED_FDS = 253

#: Every op the daemon answers. Ops in MUTATING need a token on listeners that require one;
#: so do ops in PEER, whatever `token_reads` says.
OPS = frozenset(
    {
        "hello",
        "status",
        "ls",
        "info",
        "open",
        "release",
        "wait",
        "nodes",
        "put_begin",
        "put_commit",
        "put_abort",
        "delete",
        "replicate",
        "load",
        "stream_open",
        "stream_chunks",
        "stream_pair",
        "publish",
        "unpublish",
    }
)
MUTATING = frozenset({"put_begin", "put_commit", "put_abort", "delete", "replicate", "load", "publish", "unpublish"})
#: Ops only daemons call on each other (streaming pulls). They change no set, but they pin
#: replicas, hold upload slots and move egress: a separate set, so that a listener with a token
#: never serves them without it (even where reads are open to all).
PEER = frozenset({"stream_open", "stream_chunks", "stream_pair"})


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes | bytearray, limit: int = MAX_FRAME) -> int:
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"frame of {length} bytes exceeds the {limit}-byte limit")
    return length


def decode(body: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=MAX_FRAME)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError("a frame must hold a map")
    return message
