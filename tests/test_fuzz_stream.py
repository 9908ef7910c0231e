"""Fuzzing the daemon-to-daemon stream ops (`wire.PEER`) on a real daemon in a cluster (real
etcd, Mooncake TCP): at least 50,000 frames over TCP, with the token and without, against real
stream pins of real sets: right arguments with one wrong, chunk lists out of range, bitmaps one
byte off, declines of chunks never granted, pins of other connections. Not one reply may be
`internal`, unauthenticated ones are all refused, the daemon's memory stays bounded, and
afterwards it holds no stream pin, slot or served entry and its egress never went negative.
`TENSORD_FUZZ_STREAM_FRAMES` and `TENSORD_FUZZ_SEED` change the amount and the seed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import msgpack
import pytest
import torch

from tensord_contract import wire
from tensord_dataplane.transport.mooncake import available
from tests.etcd_server import free_port
from tests.test_fuzz import Conn, Fuzzer, _check, _connect, _frame

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")

FRAMES = int(os.environ.get("TENSORD_FUZZ_STREAM_FRAMES", "50000"))
SEED = int(os.environ.get("TENSORD_FUZZ_SEED", "9"))
TOKEN = "stream-fuzz"
SETS = ["fz/a", "fz/b"]  # held: stream_open succeeds on them
CHUNKS = [65536, 131072, 65536 * 3, 256, 0, -65536, 2**40, 2**63 - 1, 65537]
NODES = ["peer-a", "peer-b", "", "x" * 65, "fzs", "é", None]
OPS = ["stream_open", "stream_chunks", "stream_chunks", "stream_chunks", "stream_pair", "release"]


class StreamFuzzer(Fuzzer):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.pins: list[int] = []  # stream pins this connection holds (and some it does not)

    def chunk_list(self) -> Any:
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            return [r.randrange(8) for _ in range(r.randrange(6))]
        if kind == 1:
            return [r.choice([-1, 64, 10**6, 2**63 - 1]) for _ in range(r.randrange(1, 3))]
        if kind == 2:
            return list(range(r.randrange(70)))
        if kind == 3:
            return [r.randrange(8), r.choice([1.5, "3", None, True])]
        return self.value() if kind == 4 else None

    def stream_args(self, op: str) -> dict[Any, Any]:
        r = self.rng
        if op == "stream_open":
            args = {"name": r.choice([*SETS, "fz/none"]), "version": r.choice([1, 1, 1, 2, 0, "1"]),
                    "node": r.choice(NODES), "chunk": r.choice(CHUNKS)}  # fmt: skip
        elif op == "stream_chunks":
            count = r.choice([4, 5, 8, 13, 1000])
            args = {
                "pin": r.choice([*self.pins, r.randrange(1, 10 ** 6), -1, "1"]) if self.pins else r.randrange(1, 99),
                "chunks": self.chunk_list(), "force": self.chunk_list(), "done": self.chunk_list(),
                "declined": self.chunk_list(), "wait": 0 if r.random() < 0.95 else r.choice([-1, 0.001, 1e9, "0"]),
            }  # fmt: skip
            if r.random() < 0.4:
                args["want"] = r.randbytes(-(-count // 8) + r.choice([0, 0, 0, 1, -1]))
                args["limit"] = r.choice([1, 2, 8, 0, -1, 10**9])
                args["start"] = r.choice([0, 1, 3, -1, 10**6, None])
            if r.random() < 0.05:
                args.update(push=True, device=r.choice(["cpu", "cuda:0", "x", None]))
        elif op == "stream_pair":
            args = {"node": r.choice(NODES), "host": r.choice(["127.0.0.1", "", "::1"]), "port": r.randrange(-5, 70000),
                    "key": r.choice(["k", "x" * 300]), "backend": r.choice(["gloo", "nccl", "mpi"]),
                    "device": "cpu", "to": r.choice(["cpu", "gpu"])}  # fmt: skip
        else:
            args = {"pin": r.choice(self.pins) if self.pins and r.random() < 0.5 else r.randrange(-2, 10**6)}
        for key in list(args):
            if r.random() < 0.08:  # one argument wrong, missing or extra
                roll = r.random()
                if roll < 0.5:
                    args[key] = self.value()
                elif roll < 0.8:
                    del args[key]
                else:
                    args[self.key()] = self.value()
        return {k: v for k, v in args.items() if v is not None or r.random() < 0.3}

    def stream_body(self) -> bytes:
        r = self.rng
        if r.random() < 0.9:
            op = r.choice(OPS)
            message = {"id": r.randrange(1, 2**31), "op": op, "args": self.stream_args(op)}
            return msgpack.packb(message, use_bin_type=True)
        if r.random() < 0.5:  # not a request at all (other ops could delete the sets)
            return r.randbytes(r.randrange(64))
        return msgpack.packb(self.value())


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def node(start_daemon, etcd):
    port = free_port()
    config = (
        f'[daemon]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n'
        f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = 2\n'
        '[transport]\nprotocol = "tcp"\n'
        '[fleet]\nchunk_bytes = "64KiB"\nwait_seconds = 0.02\npair_groups = false\n'
    )
    d = start_daemon("fzs", config=config)
    d.port = port  # type: ignore[attr-defined]
    return d


def _round(node: Any, fuzz: StreamFuzzer, frames: int, seen: dict[str, int]) -> tuple[int, int]:
    """Connections until `frames` frames were sent; (sent, answered)."""
    rng = fuzz.rng
    sent = answered = 0
    while sent < frames:
        conn = Conn(_connect(node, node.port, True))
        authorized = rng.random() < 0.6
        hello: dict[str, Any] = {"protocol": wire.PROTOCOL_VERSION}
        if authorized:
            hello["token"] = TOKEN
        opens = [{"name": rng.choice(SETS), "version": 1, "node": "peer-a", "chunk": 65536 * rng.randrange(1, 3)}]
        opens *= rng.randrange(0, 4)
        head = [msgpack.packb({"id": 1, "op": "hello", "args": hello})]
        head += [msgpack.packb({"id": 2, "op": "stream_open", "args": a}) for a in opens]
        conn.sock.sendall(b"".join(_frame(b) for b in head))
        replies = conn.replies(len(head))
        for reply in replies:
            _check(reply, seen)
        assert replies[0]["ok"]
        for reply in replies[1:]:  # without the token no stream op is served
            assert reply["ok"] == authorized, reply
        fuzz.pins = [r["result"]["pin"] for r in replies[1:] if r["ok"]]
        body = [fuzz.stream_body() for _ in range(rng.randrange(100, 400))]
        batch = b"".join(_frame(b) for b in body)

        def send(sock: Any = conn.sock, batch: bytes = batch) -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(batch)

        sender = threading.Thread(target=send)
        sender.start()
        got = conn.replies(len(body))
        sender.join()
        for reply in got:
            _check(reply, seen)
            if not authorized and reply.get("ok"):  # only the daemon's own ops are served
                assert not isinstance(reply["result"], dict) or "granted" not in reply["result"], reply
        conn.sock.close()
        sent += len(head) + len(body)
        answered += len(replies) + len(got)
    return sent, answered


def test_fuzzed_stream_ops_get_no_internal_reply_and_leave_nothing_behind(node) -> None:
    g = torch.Generator().manual_seed(1)
    with node.client() as c:
        for i, name in enumerate(SETS):
            c.put(name, {f"w{j}": torch.randn(20_000 + 997 * j, generator=g) for j in range(3 + i)})
    fuzz = StreamFuzzer(SEED)
    seen: dict[str, int] = {}
    t0 = time.monotonic()
    warm = _round(node, fuzz, 2000, seen)  # the daemon's allocations settle first
    rss0 = _rss(node.pid)
    sent, answered = _round(node, fuzz, FRAMES, seen)
    rss1 = _rss(node.pid)
    elapsed = time.monotonic() - t0
    print(f"fuzzed {sent + warm[0]} stream frames in {elapsed:.1f} s; RSS {rss0 >> 20} -> {rss1 >> 20} MiB: {seen}")
    assert sent >= FRAMES and answered > 0.9 * sent
    assert seen.get("ok", 0) > 1000 and seen.get("unauthorized", 0) > 1000 and seen.get("invalid_argument", 0) > 1000
    assert rss1 - rss0 < 64 << 20, (rss0, rss1)
    assert node.proc is not None and node.proc.poll() is None
    with node.client() as c:
        deadline = time.monotonic() + 10
        while (egress := c.status()["egress"])["streams"]:
            assert time.monotonic() < deadline, egress
            time.sleep(0.05)
        assert egress["served"] == 0 and egress["busy"] == 0 and egress["chunks"] >= 0, egress
        assert sorted(s["name"] for s in c.ls()) == SETS
        assert c.get("fz/a", verify=True)
    log = node.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]
