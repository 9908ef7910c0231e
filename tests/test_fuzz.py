"""Fuzzing the control plane: more than 100,000 frames of every kind of wrong at one daemon.

Random bytes, truncated frames, extreme length prefixes, wrong types in every place, unhashable
values, integers msgpack barely holds, deep nesting, byte-string keys, junk before hello and
over TCP. Not one reply may be `internal`; afterwards the daemon holds nothing for the fuzzing
connections and still serves bit-exact bytes. `TENSORD_FUZZ_FRAMES` and `TENSORD_FUZZ_SEED`
change the amount and the seed.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

import sdk
import tensord_contract.errors
from tensord_contract import wire
from tensord_contract.manifest import Table
from tests.etcd_server import free_port

FRAMES = int(os.environ.get("TENSORD_FUZZ_FRAMES", "100000"))
SEED = int(os.environ.get("TENSORD_FUZZ_SEED", "9"))
TOKEN = "fuzz-token"
PROBE = "probe/kept"  # never touched by the fuzzer: its names come from NAMES only
NAMES = ["fz", "fz/a", "fz/b.c", "x-1/y_2", "fz/a/b/c"]
KEYS = [
    "name", "version", "device", "tensors", "origin", "reservation", "fingerprints", "pin", "prefix",
    "path", "threads", "exclude", "to", "after", "timeout", "protocol", "client", "token",
]  # fmt: skip
INTS = [0, 1, -1, 2, 7, 255, 256, 65535, 2**31, 2**32 - 1, 2**53, 2**63 - 1, 2**64 - 1, -(2**63)]
FLOATS = [0.0, -0.0, 1.5, float("nan"), float("inf"), float("-inf"), 1e308]
STRINGS = ["", "cpu", "cuda:0", "cuda:99", "latest", "a\x00b", "é", "\u202e", "x" * 300, "../..", "/etc/passwd"]


SIGNATURES = {  # op -> (required, optional) arguments
    "status": ((), ()),
    "nodes": ((), ()),
    "ls": ((), ("prefix",)),
    "info": (("name",), ("version",)),
    "open": (("name",), ("version", "exclude")),
    "release": (("pin",), ()),
    "wait": (("name", "after"), ("timeout",)),
    "put_begin": (("name", "device", "tensors"), ("origin",)),
    "put_commit": (("reservation", "fingerprints"), ("fp",)),
    "put_abort": (("reservation",), ()),
    "delete": (("name",), ("version",)),
    "replicate": (("name",), ("version", "device", "to")),
    "load": (("path", "name"), ("device", "threads")),
}


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.reservation = 0  # one this connection owns, when it made one

    def scalar(self) -> Any:
        r = self.rng
        kind = r.randrange(9)
        if kind == 0:
            return r.choice(INTS)
        if kind == 1:
            return r.randrange(-(2**63), 2**64)
        if kind == 2:
            return r.choice(FLOATS)
        if kind == 3:
            return r.choice(STRINGS)
        if kind == 4:
            return r.choice(NAMES)
        if kind == 5:
            return r.randbytes(r.randrange(8))
        if kind == 6:
            return r.choice([None, True, False])
        if kind == 7:
            return msgpack.ExtType(r.randrange(128), r.randbytes(r.randrange(4)))
        return "".join(chr(r.randrange(32, 0x2FF)) for _ in range(r.randrange(12)))

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(10)
        if depth > 3 or kind < 5:
            return self.scalar()
        if kind < 7:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        if kind == 7:  # a map with keys of mixed types
            return {self.key(): self.value(depth + 1) for _ in range(r.randrange(3))}
        if kind == 8:
            return self.tensors()
        return self.nested(r.randrange(2, 500))  # msgpack packs at most ~500 levels

    def key(self) -> Any:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(KEYS)
        if r < 0.8:
            return self.rng.randbytes(self.rng.randrange(1, 6))
        return self.rng.choice(STRINGS)

    def nested(self, depth: int) -> Any:
        value: Any = self.scalar()
        wrap = self.rng.choice([lambda v: [v], lambda v: {"k": v}])
        for _ in range(depth):
            value = wrap(value)
        return value

    def tensors(self) -> Any:
        """A tensor table that is nearly right: one column wrong (bad bytes, a wrong length or
        count, another type), or dimensions that are each valid and together absurd, or none."""
        r = self.rng
        n = r.randrange(4)
        shapes = [[r.randrange(1, 64) for _ in range(r.randrange(3))] for _ in range(n)]
        if n and r.random() < 0.1:  # huge, but each dimension valid: out of capacity
            shapes = [[r.randrange(2**40, 2**47), r.randrange(2**10, 2**14)] for _ in range(n)]
        dtypes = [r.choice(["float32", "bfloat16", "int8"]) for _ in range(n)]
        try:
            table = Table.build([f"t{i}" for i in range(n)], dtypes, shapes).to_wire()
        except sdk.InvalidArgument:  # over the per-tensor limit: send the columns anyway
            table = Table.of_columns([f"t{i}" for i in range(n)], np.zeros(n, np.uint8),
                                     np.full(n, 2, np.uint8), np.array(shapes, np.int64).ravel()).to_wire()  # fmt: skip
        if r.random() < 0.7:
            key = r.choice(["count", "names", "dtypes", "ndims", "dims", self.key()])
            kind = r.randrange(4)
            if kind == 0 or key == "count":
                table[key] = self.value(3)
            elif kind == 1 and isinstance(table.get(key), bytes):  # one byte too many or too few
                table[key] = table[key][:-1] if table[key] and r.random() < 0.5 else table[key] + b"\xff"
            elif kind == 2:
                table[key] = r.randbytes(r.randrange(24))
            else:
                table.pop(key, None)
        return table

    def good(self, key: str) -> Any:
        """A value that is right for `key` (it may still name something that does not exist)."""
        r = self.rng
        if key == "name":
            return r.choice(NAMES)
        if key == "version":
            return r.choice([None, "latest", 1, 2, 3])
        if key in ("reservation", "pin"):
            return self.reservation if key == "reservation" and self.reservation else r.randrange(1, 50)
        if key == "fingerprints":  # one little-endian uint64 per tensor
            return r.randbytes(8 * r.randrange(4) + (r.random() < 0.1))
        if key == "tensors":
            return self.tensors()
        return {
            "device": "cpu", "origin": "fuzz", "prefix": r.choice(["", "fz/"]), "path": "/tmp/fuzz.safetensors",
            "threads": r.randrange(1, 8), "exclude": [], "to": "fuzzed", "after": r.randrange(5), "timeout": 0,
        }.get(key)  # fmt: skip

    def args(self, op: str) -> dict[Any, Any]:
        """Arguments for `op`: its own keys with mostly right values, one of them often wrong;
        sometimes a key missing or one too many; sometimes anything at all."""
        r = self.rng
        if op not in SIGNATURES or r.random() < 0.2:
            return {(self.key() if r.random() < 0.15 else r.choice(KEYS)): self.value() for _ in range(r.randrange(5))}
        required, optional = SIGNATURES[op]
        keys = [k for k in required if r.random() > 0.05] + [k for k in optional if r.random() < 0.5]
        args: dict[Any, Any] = {k: self.good(k) if r.random() < 0.75 else self.value() for k in keys}
        if r.random() < 0.05:
            args[self.key()] = self.value()
        return args

    def request(self) -> dict[Any, Any]:
        """A request whose envelope is right most of the time and whose args are not."""
        r = self.rng
        op = r.choice(sorted(wire.OPS - {"hello"})) if r.random() < 0.9 else self.value()
        args = self.args(op if isinstance(op, str) else "")
        if op == "wait":  # a well-formed wait blocks the connection; keep it short
            args["timeout"] = 0
        message: dict[Any, Any] = {"id": r.randrange(1, 2**31), "op": op, "args": args}
        if r.random() < 0.1:  # break the envelope
            message[r.choice(["id", "op", "args"])] = self.value()
        if r.random() < 0.03:
            message[self.key()] = self.value()
        return message

    def hello(self) -> dict[Any, Any]:
        """A hello that is right (with the token, or without) most of the time."""
        r = self.rng
        args: dict[Any, Any] = {"protocol": wire.PROTOCOL_VERSION}
        if r.random() < 0.5:
            args["token"] = TOKEN
        if r.random() < 0.1:
            args[r.choice(["token", "protocol", "client", *KEYS])] = self.value()
        return {"id": 1, "op": "hello", "args": args}

    def body(self) -> bytes:
        """One frame body: a request, or something that is not one."""
        r = self.rng.random()
        if r < 0.80:
            return msgpack.packb(self.request(), use_bin_type=self.rng.random() < 0.95)
        if r < 0.88:
            return self.rng.randbytes(self.rng.randrange(64))  # random bytes
        if r < 0.94:
            return msgpack.packb(self.value())  # a value that is not a request map
        if r < 0.96:  # a valid request cut short
            full = msgpack.packb(self.request())
            return full[: self.rng.randrange(len(full))]
        if r < 0.98:  # nested deeper than msgpack packs: written by hand
            op = self.rng.choice(sorted(wire.OPS))
            head = msgpack.packb({"id": 5, "op": op, "args": {self.rng.choice(KEYS): None}})[:-1]
            return head + self.rng.choice([b"\x91", b"\x81\xa1k"]) * self.rng.randrange(500, 1200) + b"\x01"
        return msgpack.packb(self.request())[:3] + self.rng.randbytes(20)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


class Conn:
    """A connection that pipelines frames and reads back what it is owed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def replies(self, n: int) -> list[Any]:
        """Up to n replies; fewer when the daemon closes the connection."""
        out: list[Any] = []
        while len(out) < n:
            while len(self.buf) >= 4:
                (length,) = struct.unpack(">I", self.buf[:4])
                if len(self.buf) < 4 + length:
                    break
                out.append(msgpack.unpackb(self.buf[4 : 4 + length], raw=False, strict_map_key=False))
                self.buf = self.buf[4 + length :]
                if len(out) == n:
                    return out
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return out
            self.buf += chunk
        return out


def _check(reply: Any, seen: dict[str, int]) -> None:
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    if reply["ok"]:
        seen["ok"] = seen.get("ok", 0) + 1
        return
    error = reply["error"]
    assert error["code"] in tensord_contract.errors.CODES and error["code"] != "internal", reply
    seen[error["code"]] = seen.get(error["code"], 0) + 1


def _connect(daemon, port: int, tcp: bool) -> socket.socket:
    if tcp:
        return socket.create_connection(("127.0.0.1", port), timeout=30)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(daemon.socket)
    return s


@pytest.fixture
def target(start_daemon):
    port = free_port()
    d = start_daemon("fuzzed", config=f'[daemon]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n')
    d.port = port  # type: ignore[attr-defined]
    return d


def test_fuzzed_frames_get_no_internal_reply_and_the_daemon_still_serves(target) -> None:
    data = {f"w{i}": torch.randn(1000 + i) for i in range(5)} | {"i": torch.randint(-(2**62), 2**62, (77,))}
    with target.client() as c:
        assert c.put(PROBE, data) == 1
    fuzz = Fuzzer(SEED)
    rng = fuzz.rng
    sent = answered = connections = 0
    seen: dict[str, int] = {}
    t0 = time.monotonic()
    while sent < FRAMES:
        tcp = rng.random() < 0.2
        conn = Conn(_connect(target, target.port, tcp))
        connections += 1
        frames = [] if rng.random() < 0.05 else [msgpack.packb(fuzz.hello())]  # most say hello first
        fuzz.reservation = 0
        if frames and rng.random() < 0.3:  # own a reservation, so that commits get past ownership
            one = Table.build(["t0"], ["int8"], [[rng.randrange(1, 9)]]).to_wire()
            begin = {"name": rng.choice(NAMES), "device": "cpu", "tensors": one}
            frames.append(msgpack.packb({"id": 2, "op": "put_begin", "args": begin}))
            conn.sock.sendall(b"".join(_frame(b) for b in frames))
            replies = conn.replies(len(frames))
            for reply in replies:
                _check(reply, seen)
            sent, answered, frames = sent + len(frames), answered + len(replies), []
            if replies and replies[-1]["ok"]:
                fuzz.reservation = replies[-1]["result"]["reservation"]
        frames += [fuzz.body() for _ in range(rng.randrange(50, 400))]
        ending = rng.random()
        batch = b"".join(_frame(b) for b in frames)
        if ending < 0.05:  # an extreme length prefix: answered, then the connection is closed
            batch += struct.pack(">I", rng.choice([wire.MAX_FRAME + 1, 2**31, 2**32 - 1]))
            frames.append(b"")
        elif ending < 0.10:  # a frame cut short by the end of the connection
            batch += struct.pack(">I", rng.randrange(1, 1 << 16)) + rng.randbytes(rng.randrange(100))

        def send(sock: socket.socket = conn.sock, batch: bytes = batch, cut: bool = 0.05 <= ending < 0.10) -> None:
            try:
                sock.sendall(batch)
                if cut:
                    sock.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):  # closed early: three failed hellos
                pass

        sender = threading.Thread(target=send)  # replies are read meanwhile: no buffer fills up
        sender.start()
        replies = conn.replies(len(frames))
        sender.join()
        for reply in replies:
            _check(reply, seen)
        sent += len(frames)
        answered += len(replies)
        conn.sock.close()
    elapsed = time.monotonic() - t0
    print(f"fuzzed {sent} frames ({answered} answered) on {connections} connections in {elapsed:.1f} s: {seen}")
    assert answered > FRAMES * 0.5  # most were read and answered (the rest: after a close)
    assert seen.get("ok", 0) > 0 and seen.get("invalid_argument", 0) > 0 and seen.get("protocol_error", 0) > 0

    assert target.proc is not None and target.proc.poll() is None
    with target.client() as c:
        deadline = time.monotonic() + 10
        while (c.status()["reservations"], c.status()["pins"]) != (0, 0):  # sessions closing
            assert time.monotonic() < deadline, c.status()
            time.sleep(0.05)
        got = c.get(PROBE, verify=True)
        assert got.keys() == data.keys() and all(torch.equal(got[k], v) for k, v in data.items())
        fresh = {"x": torch.randn(4096)}
        version = c.put("after/fuzz", fresh)
        assert torch.equal(c.get("after/fuzz", version)["x"], fresh["x"])
    log = target.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]
