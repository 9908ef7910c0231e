"""Daemon-to-daemon ops under attack: real daemons with a token on TCP, real etcd, Mooncake TCP
on loopback, and a hand-driven connection (`tests.frames.Raw`) that sends what a hostile or
broken peer would: stream ops without the token, more streams than a puller opens, never-read
grants, declines of chunks it was never granted."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tensord_contract import wire
from tensord_dataplane.tensors import as_bytes
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.etcd_server import EtcdServer, free_port
from tests.frames import Raw, code

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")

TOKEN = "peer-secret"
CHUNK = 64 << 10
NAME = "peer/set"


def _daemon(workdir: Path, etcd: EtcdServer, node: str) -> DaemonProcess:
    port = free_port()
    config = (
        f'[daemon]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n'
        f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = 2\n'
        '[transport]\nprotocol = "tcp"\n[fleet]\nchunk_bytes = "64KiB"\nwait_seconds = 0.5\n'
    )
    d = DaemonProcess(workdir, node, config)
    d.tcp = ("127.0.0.1", port)  # type: ignore[attr-defined]
    return d


def _set() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {f"w{i}": torch.randn(2**17 + 13 * i, generator=g) for i in range(8)}  # ~4 MiB, 64 chunks


def _egress(d: DaemonProcess) -> dict[str, int]:
    with d.client() as c:
        return dict(c.status()["egress"])


def _rss(d: DaemonProcess) -> int:
    with open(f"/proc/{d.pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))


def _peer(d: DaemonProcess, token: str | None = TOKEN) -> Raw:
    raw = Raw(hello=False, tcp=d.tcp)  # type: ignore[attr-defined]
    args: dict[str, Any] = {"protocol": wire.PROTOCOL_VERSION, "client": "hostile"}
    if token is not None:
        args["token"] = token
    assert raw.call("hello", **args)["ok"]
    return raw


def _open(raw: Raw, node: str = "hog", chunk: int = CHUNK) -> dict[str, Any]:
    reply = raw.call("stream_open", name=NAME, version=1, node=node, chunk=chunk)
    assert reply["ok"], reply
    return dict(reply["result"])


@pytest.fixture(scope="module")
def pair(etcd, tmp_path_factory: pytest.TempPathFactory):
    """Two nodes: pa holds the set, pb pulls it."""
    workdir = tmp_path_factory.mktemp("peers")
    nodes = {n: _daemon(workdir, etcd, n) for n in ("pa", "pb")}
    threads = [threading.Thread(target=d.start, args=(60,)) for d in nodes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        with nodes["pa"].client() as c:
            c.put(NAME, _set())
        yield nodes
    finally:
        for d in nodes.values():
            d.kill()


def test_stream_ops_without_the_token_are_refused_and_change_nothing(pair) -> None:
    pa = pair["pa"]
    before = _egress(pa)
    raw = _peer(pa, token=None)
    try:
        assert raw.call("status")["ok"]  # reads stay open (token_reads is off)
        assert code(raw.call("stream_open", name=NAME, version=1, node="x", chunk=CHUNK)) == "unauthorized"
        assert code(raw.call("stream_chunks", pin=1, chunks=[0])) == "unauthorized"
        assert code(raw.call("stream_pair", node="pb", host="127.0.0.1", port=1, key="k")) == "unauthorized"
    finally:
        raw.close()
    assert _egress(pa) == before
    wrong = Raw(hello=False, tcp=pa.tcp)  # type: ignore[attr-defined]
    try:
        reply = wrong.call("hello", protocol=wire.PROTOCOL_VERSION, token="wrong")
        assert code(reply) == "unauthorized"
        assert code(wrong.call("stream_open", name=NAME, version=1, node="x", chunk=CHUNK)) == "protocol_error"
    finally:
        wrong.close()


def test_a_peer_that_opens_many_streams_and_leaves_leaves_nothing_behind(pair) -> None:
    pa = pair["pa"]
    rss0 = _rss(pa)
    for _ in range(3):
        raw = _peer(pa)
        opened = [_open(raw, chunk=CHUNK * (1 + i % 4)) for i in range(16)]  # as many as it may hold
        assert code(raw.call("stream_open", name=NAME, version=1, node="hog", chunk=CHUNK)) == "invalid_argument"
        other = Raw(hello=False, tcp=pa.tcp)  # type: ignore[attr-defined]
        assert other.call("hello", protocol=wire.PROTOCOL_VERSION, token=TOKEN)["ok"]
        _open(other, node="hog2")
        # one connection streams for one node
        assert code(other.call("stream_open", name=NAME, version=1, node="hog3", chunk=CHUNK)) == "invalid_argument"
        for start in range(0, 64, 3):  # open requests from many starting points: cached orders
            s = opened[start % 4]
            want = bytes([0xFF]) * (-(-s["count"] // 8))
            reply = raw.call("stream_chunks", pin=s["pin"], want=want, limit=1, start=start % s["count"], wait=0)
            assert reply["ok"], reply
        assert code(raw.call("stream_chunks", pin=12345, chunks=[0])) == "invalid_argument"
        tiny = _peer(pa)
        assert code(tiny.call("stream_open", name=NAME, version=1, node="x", chunk=256)) == "invalid_argument"
        tiny.close()
        during = _egress(pa)
        assert during["streams"] == 17 and during["busy"] > 0
        raw.close()
        other.close()
        deadline = time.monotonic() + 20
        while (e := _egress(pa))["streams"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert e["streams"] == 0 and e["served"] == 0 and e["busy"] == 0, e
    assert _rss(pa) - rss0 < 48 << 20  # three rounds left no memory behind
    with pa.client() as c:  # the pins went: the set can be deleted and put again
        assert c.info(NAME)["version"] == 1


def test_declining_chunks_never_granted_changes_no_counter(pair) -> None:
    pa = pair["pa"]
    raw = _peer(pa)
    try:
        pin = _open(raw, node="liar")["pin"]
        base = _egress(pa)
        reply = raw.call("stream_chunks", pin=pin, declined=list(range(40)))
        assert reply["ok"], reply
        assert _egress(pa)["chunks"] == base["chunks"] and _egress(pa)["busy"] == 0
        granted = raw.call("stream_chunks", pin=pin, chunks=[5])["result"]["granted"]
        assert granted == [5]
        assert _egress(pa)["chunks"] == base["chunks"] + CHUNK
        for _ in range(3):  # declined once it counts; again, or as someone else's, it does not
            assert raw.call("stream_chunks", pin=pin, declined=[5, 5, 6])["ok"]
            assert _egress(pa)["chunks"] == base["chunks"]
        assert _egress(pa)["busy"] == 0
    finally:
        raw.close()
    assert _egress(pa)["chunks"] >= 0


def test_a_real_replicate_works_while_a_hostile_peer_holds_what_it_may(pair) -> None:
    pa, pb = pair["pa"], pair["pb"]
    hogs = [_peer(pa), _peer(pa)]
    try:
        for i, raw in enumerate(hogs):
            pin = _open(raw, node=f"hog{i}")["pin"]
            held: list[int] = []
            for _ in range(3):  # asks for everything, reads nothing, acknowledges nothing
                result = raw.call("stream_chunks", pin=pin, chunks=list(range(64)), force=list(range(64)))["result"]
                held += result["granted"]
            assert len(held) == [6, 2][i]  # its share: one connection never holds every slot
        assert _egress(pa)["busy"] == 8  # two do, until their grants expire unread (5 s here)
        t0 = time.monotonic()
        with pb.client() as c:
            c.replicate(NAME)
        took = time.monotonic() - t0
    finally:
        for raw in hogs:
            raw.close()
    with pb.client() as c, c.mount(NAME) as m:
        src = _set()
        assert all(torch.equal(as_bytes(m.tensors[k]), as_bytes(src[k])) for k in src)
    assert took < 30
