"""Hostile and malformed frames: answered with a precise code, never `internal`, never a dropped
connection that should have been answered; what an unauthenticated peer may cost is bounded."""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import msgpack
import pytest
import torch

import sdk
from tensord_contract import wire
from tensord_contract.manifest import MAX_MANIFEST_BYTES, MAX_TENSORS, Table
from tests.etcd_server import free_port
from tests.frames import Raw, code, log_clean

TOKEN = "hostile-secret"


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"id": 1, "op": [1], "args": {}}, "protocol_error"),  # unhashable op
        ({"id": 1, "op": {"a": 1}, "args": {}}, "protocol_error"),
        ({"id": 1, "op": "put_abort", "args": {"reservation": [1]}}, "invalid_argument"),  # unhashable id
        ({"id": 1, "op": "put_commit", "args": {"reservation": {"a": 1}, "fingerprints": []}}, "invalid_argument"),
        ({"id": 1, "op": "release", "args": {"pin": [1]}}, None),  # an unknown pin: released False
        ({"id": 1, "op": "ls", "args": {b"prefix": "", "x": 1}}, "invalid_argument"),  # mixed key types
        ({"id": 1, "op": "info", "args": {b"name": "x"}}, "invalid_argument"),
        ({"id": 1, "op": "load", "args": {"path": "/a", "name": "a", "device": 5}}, "invalid_argument"),
        ({"id": 1, "op": "load", "args": {"path": "/a\x00b", "name": "a"}}, "invalid_argument"),
        ({"id": 1, "op": "load", "args": {"path": "/" + "a" * 5000, "name": "a"}}, "unauthorized"),
        ({"id": 1, "op": "ls", "args": {"op": "delete"}}, "invalid_argument"),
        ({"id": 1, "op": "ls", "args": {"x" * 100: 1, "y": [[[[[[1]]]]]]}}, "invalid_argument"),
        ({"id": 1, "op": "ls", "args": {"x": [[[[[[[[[[[[1]]]]]]]]]]]] * 100}}, "invalid_argument"),
    ],
)
def test_malformed_requests_get_precise_codes(daemon, raw: Raw, request_: dict[str, Any], expected: str) -> None:
    raw.send(request_)
    reply = raw.recv()
    if expected is None:
        assert reply is not None and reply["ok"] and reply["result"]["released"] is False
    else:
        assert code(reply) == expected
    assert raw.call("ls")["ok"]  # the connection goes on
    log_clean(daemon.log)


def test_deeply_nested_arguments_are_refused(daemon, raw: Raw) -> None:
    nested: Any = 1
    for _ in range(1000):
        nested = [nested]
    raw.send({"id": 7, "op": "info", "args": {"name": nested}})
    assert code(raw.recv()) == "invalid_argument"
    raw.send({"id": 8, "op": "put_begin", "args": {"name": "deep", "device": "cpu", "tensors": nested}})
    assert code(raw.recv()) == "invalid_argument"
    assert raw.call("ls")["ok"]
    log_clean(daemon.log)


def test_error_with_an_integer_msgpack_cannot_hold_is_still_answered(daemon, raw: Raw) -> None:
    """16 tensors of 2**61 bytes each: OutOfCapacity (not a layout that wraps around int64),
    whose details carry the 2**65 bytes requested; the reply drops them instead of the
    connection."""
    tensors = Table.build([f"t{i}" for i in range(16)], ["float32"] * 16, [[2**47, 2**12]] * 16).to_wire()
    reply = raw.call("put_begin", name="absurd", device="cpu", tensors=tensors)
    assert code(reply) == "out_of_capacity"
    assert "bytes requested" in reply["error"]["message"]
    assert raw.call("status")["result"]["reservations"] == 0
    log_clean(daemon.log)


def test_a_set_whose_manifest_no_reply_could_carry_is_refused_at_put_begin(daemon, raw: Raw) -> None:
    """A put that fits in a frame but whose manifest (offsets, sizes and fingerprints added)
    would not fit an `open` reply: accepted, it could never be read. It is refused at once,
    with the limit named, and nothing is reserved (tests/test_servable.py: both sides)."""
    n = MAX_TENSORS
    names = b"\0".join(b"%07d" % i + b"n" * 93 for i in range(n))
    table = {"count": n, "names": names, "dtypes": bytes(n), "ndims": b"\x01" * n, "dims": bytes(8 * n)}
    message = {"id": 3, "op": "put_begin", "args": {"name": "huge-manifest", "device": "cpu", "tensors": table}}
    body = msgpack.packb(message)
    assert len(body) <= wire.MAX_FRAME
    raw.sock.settimeout(120)
    raw.send_bytes(struct.pack(">I", len(body)) + body)
    reply = raw.recv()
    assert code(reply) == "invalid_argument" and str(MAX_MANIFEST_BYTES) in reply["error"]["message"]
    status = raw.call("status")["result"]  # same connection: it is still open
    assert status["pins"] == 0 and status["reservations"] == 0
    assert code(raw.call("info", name="huge-manifest")) == "not_found"


def test_versions_msgpack_cannot_hold_are_invalid_in_the_sdk(client: sdk.Client) -> None:
    client.put("big-version", {"x": torch.ones(1)})
    for version in (2**63, 2**64, 2**70, -(2**64)):
        for call in (
            lambda v=version: client.get("big-version", v),
            lambda v=version: client.info("big-version", v),
            lambda v=version: client.mount("big-version", v),
            lambda v=version: client.delete("big-version", v),
            lambda v=version: list(client.watch("big-version", after=v, timeout=0.1)),
        ):
            with pytest.raises(sdk.InvalidArgument):
                call()
    assert client.info("big-version")["versions"] == [1]  # the client goes on
    client.delete("big-version")


# -- what an unauthenticated peer may cost ------------------------------------------------------


def test_frames_before_hello_are_capped(daemon) -> None:
    r = Raw(daemon.socket, hello=False)
    r.send_bytes(struct.pack(">I", wire.MAX_UNTRUSTED_FRAME + 1))
    assert code(r.recv()) == "protocol_error"
    assert r.recv() is None  # closed without reading the body
    r.close()
    r = Raw(daemon.socket)  # after hello, a large frame is read and answered
    big = {"id": 2, "op": "ls", "args": {"prefix": "x" * (wire.MAX_UNTRUSTED_FRAME * 4)}}
    r.send(big)
    assert code(r.recv()) == "invalid_argument"
    assert r.call("ls")["ok"]
    r.close()


@pytest.fixture
def guarded(start_daemon):
    """A daemon with a TCP listener that needs a token, and short timeouts."""
    port = free_port()
    config = f'[daemon]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\nhello_timeout = 1\nframe_timeout = 1\n'
    d = start_daemon("guarded", config=config)
    d.port = port  # type: ignore[attr-defined]
    return d


def test_tcp_frames_are_capped_until_the_token_is_shown(guarded) -> None:
    addr = ("127.0.0.1", guarded.port)
    big = {"id": 2, "op": "ls", "args": {"prefix": "x" * (wire.MAX_UNTRUSTED_FRAME * 2)}}
    r = Raw(tcp=addr)  # hello without the token: reads allowed, large frames not
    r.send(big)
    assert code(r.recv()) == "protocol_error"
    assert r.recv() is None
    r.close()
    r = Raw(tcp=addr, hello=False)
    assert r.call("hello", protocol=wire.PROTOCOL_VERSION, token=TOKEN)["ok"]
    r.send(big)
    assert code(r.recv()) == "invalid_argument"
    r.close()


def test_failed_hellos_are_limited_per_connection(guarded) -> None:
    r = Raw(tcp=("127.0.0.1", guarded.port), hello=False)
    for _ in range(3):
        assert code(r.call("hello", protocol=wire.PROTOCOL_VERSION, token="guess")) == "unauthorized"
    r.send({"id": 9, "op": "hello", "args": {"protocol": wire.PROTOCOL_VERSION, "token": TOKEN}})
    assert r.recv() is None  # closed after the third failure: no more guesses here
    r.close()


def test_op_inside_args_cannot_dodge_hello_or_the_token(guarded) -> None:
    with guarded.client() as c:
        c.put("kept", {"x": torch.ones(1)})
    r = Raw(tcp=("127.0.0.1", guarded.port), hello=False)
    r.send({"id": 1, "op": "hello", "args": {"op": "delete", "name": "kept"}})  # "hello" passes unchecked
    assert code(r.recv()) == "invalid_argument"
    r.close()
    with guarded.client() as c:
        assert c.info("kept")["versions"] == [1]


def test_silent_and_stalled_connections_time_out(guarded) -> None:
    silent = Raw(guarded.socket, hello=False)
    stalled = Raw(guarded.socket)
    idle = Raw(guarded.socket)
    stalled.send_bytes(struct.pack(">I", 1000) + b"\x80" * 10)  # a frame begun, never finished
    t0 = time.monotonic()
    assert silent.recv() is None and stalled.recv() is None
    assert time.monotonic() - t0 < 5
    time.sleep(1.5)
    assert idle.call("ls")["ok"]  # a trusted connection may idle between frames: pins live there
    for r in (silent, stalled, idle):
        r.close()
    assert "no hello in time" in guarded.log.read_text()


def test_a_peer_that_never_reads_its_replies_is_dropped(guarded) -> None:
    r = Raw(guarded.socket)
    r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    frame = msgpack.packb({"id": 1, "op": "status", "args": {}})
    blob = (struct.pack(">I", len(frame)) + frame) * 20_000
    r.sock.settimeout(20)
    t0 = time.monotonic()

    def send_for_ever() -> None:
        for _ in range(100):
            r.send_bytes(blob)

    with pytest.raises(OSError) as failure:  # the daemon stops reading, then closes: sending fails
        send_for_ever()
    assert isinstance(failure.value, BrokenPipeError | ConnectionResetError), failure.value
    assert time.monotonic() - t0 < 10
    r.close()
    with guarded.client() as c:
        assert c.status()["reservations"] == 0
