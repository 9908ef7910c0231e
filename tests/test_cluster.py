"""Several nodes: real etcd, three daemons on loopback, each with its own socket, TCP listener
and Mooncake Transfer Engine (TCP). Bytes between nodes move one-sided through the engine."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import sdk
from tensord_dataplane.tensors import as_bytes
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess, child_env
from tests.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")

TOKEN = "cluster-secret"
TTL = 2.0


def _config(etcd: EtcdServer, port: int, extra: str = "") -> str:
    return (
        f'[daemon]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n'
        f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = {TTL}\n'
        f'[transport]\nprotocol = "tcp"\n{extra}'
    )


class Cluster:
    def __init__(self, workdir: Path, etcd: EtcdServer) -> None:
        self.workdir, self.etcd = workdir, etcd
        self.nodes: dict[str, DaemonProcess] = {}
        self.ports: dict[str, int] = {}

    def start(self, node: str, extra: str = "") -> DaemonProcess:
        self.ports.setdefault(node, free_port())
        d = DaemonProcess(self.workdir, node, _config(self.etcd, self.ports[node], extra)).start()
        self.nodes[node] = d
        return d

    def address(self, node: str) -> str:
        return f"127.0.0.1:{self.ports[node]}"

    def client(self, node: str) -> sdk.Client:
        return self.nodes[node].client()

    def stop(self) -> None:
        for d in self.nodes.values():
            d.kill()


@pytest.fixture(scope="module")
def abc(etcd, tmp_path_factory: pytest.TempPathFactory):
    """Three long-lived nodes a, b, c for the tests that harm nobody."""
    cluster = Cluster(tmp_path_factory.mktemp("abc"), etcd)
    for node in "abc":
        cluster.start(node)
    yield cluster
    cluster.stop()


@pytest.fixture
def fresh(etcd, tmp_path: Path):
    """Nodes for tests that kill them; started by the test."""
    cluster = Cluster(tmp_path, etcd)
    yield cluster
    cluster.stop()


def _tensors(seed: int, n: int = 6, numel: int = 50_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"layer{i}.weight": torch.randn(numel, generator=g).to(torch.bfloat16) for i in range(n)}
    out["ids"] = torch.arange(17)
    out["scalar"] = torch.tensor(1.5)
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _wait_for(predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)
    return time.monotonic() - start


def test_put_on_a_get_through_c(abc) -> None:
    src = _tensors(1)
    with abc.client("a") as a, abc.client("c") as c:
        assert a.put("x/get-through-c", src) == 1
        assert [(r["node"], r["device"]) for r in c.info("x/get-through-c")["replicas"]] == [("a", "cpu")]
        assert _equal(c.get("x/get-through-c", verify=True), src)
        target = {k: torch.zeros_like(t) for k, t in src.items()}
        assert c.load_into(target, "x/get-through-c", verify=True) == 1
        assert _equal(target, src)
        assert set(c.get("x/get-through-c", names=["ids"])) == {"ids"}
        with pytest.raises(sdk.InvalidArgument, match="mount needs a replica on this node"):
            c.mount("x/get-through-c")
        assert a.status()["pins"] == 0 and c.status()["pins"] == 0  # every remote pin went back
        assert {s["name"] for s in c.ls("x/")} == {"x/get-through-c"}


def test_many_tensors_from_another_node_into_several_allocations(abc) -> None:
    """A 3,000-tensor set read from node a by a client of node c: into one flat buffer (get), and
    into targets spread over four allocations plus separate tensors (load_into), where ranges
    contiguous in memory must not be merged across two registrations."""
    from tests.data import random_tensor

    dtypes = [torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn]
    src = {f"e.{i}": random_tensor(dtypes[i % 4], (i % 50 + 1, 3), seed=i) for i in range(3_000)}
    names = list(src)
    with abc.client("a") as a, abc.client("c") as c:
        version = a.put("x/many", src)
        got = c.get("x/many", verify=True)
        assert all(torch.equal(as_bytes(got[k]), as_bytes(src[k])) for k in names)
        pools = [torch.zeros(400_000, dtype=torch.uint8) for _ in range(4)]
        target, at = {}, [0, 0, 0, 0]
        for i, (k, t) in enumerate(src.items()):
            p = i % 5
            if p == 4:
                target[k] = torch.zeros_like(t)
                continue
            target[k] = pools[p][at[p] : at[p] + t.nbytes].view(t.dtype).view(t.shape)
            at[p] = -(-(at[p] + t.nbytes) // 8) * 8
        assert c.load_into(target, "x/many", verify=True) == version
        assert all(torch.equal(as_bytes(target[k]), as_bytes(src[k])) for k in names)
        assert a.status()["pins"] == 0 and c.status()["pins"] == 0
    # and written from a process without a daemon, over the engine, through a staging buffer
    with sdk.Client(address=abc.address("b"), token=TOKEN) as remote, abc.client("b") as b:
        version = remote.put("x/many-remote", src)
        got = b.get("x/many-remote", verify=True)
        assert all(torch.equal(as_bytes(got[k]), as_bytes(src[k])) for k in names)
        part = {k: src[k] for k in names[::3]}
        with remote.reserve("x/many-remote", {k: (str(t.dtype)[6:], tuple(t.shape)) for k, t in src.items()}) as r:
            r.write_all({k: src[k] for k in names if k not in part})
            r.write_all(part)  # a staged write of every third tensor must leave the others alone
            assert r.commit() == version + 1
        got = b.get("x/many-remote", verify=True)
        assert all(torch.equal(as_bytes(got[k]), as_bytes(src[k])) for k in names)


def test_tcp_clients_need_the_token_to_write(abc) -> None:
    with sdk.Client(address=abc.address("a"), token=TOKEN) as writer:
        assert writer.put("x/tcp", {"t": torch.ones(3)}) == 1
        assert torch.equal(writer.get("x/tcp")["t"], torch.ones(3))  # bytes over the engine
    with sdk.Client(address=abc.address("a")) as anonymous:
        assert torch.equal(anonymous.get("x/tcp")["t"], torch.ones(3))  # reads need no token
        for call in (
            lambda: anonymous.put("x/tcp", {"t": torch.zeros(3)}),
            lambda: anonymous.delete("x/tcp"),
            lambda: anonymous.replicate("x/tcp"),
        ):
            with pytest.raises(sdk.Unauthorized):
                call()
    with pytest.raises(sdk.Unauthorized), sdk.Client(address=abc.address("a"), token="wrong") as bad:
        bad.ls()
    with abc.client("b") as b:
        assert b.info("x/tcp")["versions"] == [1]  # nothing changed


def test_remote_write_lands_on_the_remote_node(abc) -> None:
    src = _tensors(2)
    with sdk.Client(address=abc.address("b"), token=TOKEN) as remote:
        version = remote.put("x/remote-write", src)
    with abc.client("b") as b:
        info = b.info("x/remote-write", version)
        assert info["device"] == "cpu" and [r["node"] for r in info["replicas"]] == ["b"]
        assert _equal(b.get("x/remote-write", verify=True), src)  # local read on b
        with b.mount("x/remote-write") as m:
            assert _equal(dict(m.tensors), src)


WRITER = """
import sys, time, sdk
c = sdk.Client(address=sys.argv[1], token=sys.argv[2])
r = c.reserve("x/abandoned", {"w": ("float32", (1 << 20,))})
print("reserved", flush=True)
time.sleep(600)
"""


def test_a_writer_killed_before_commit_leaves_nothing(abc) -> None:
    env = child_env()
    with abc.client("b") as b:
        used = b.status()["devices"]["cpu"]["used"]
        with subprocess.Popen(
            [sys.executable, "-c", WRITER, abc.address("b"), TOKEN], env=env, stdout=subprocess.PIPE, text=True
        ) as child:
            assert child.stdout is not None and child.stdout.readline().strip() == "reserved"
            assert b.status()["reservations"] == 1
            child.send_signal(signal.SIGKILL)
            child.wait()
        _wait_for(lambda: b.status()["reservations"] == 0, 10)
        assert b.status()["devices"]["cpu"]["used"] == used
        with pytest.raises(sdk.NotFound):
            b.info("x/abandoned")


def test_concurrent_commits_from_two_nodes_get_distinct_versions(abc) -> None:
    versions: list[int] = []

    def writer(node: str) -> None:
        with abc.client(node) as c:
            for i in range(8):
                versions.append(c.put("x/race", {"v": torch.tensor(i)}))

    threads = [threading.Thread(target=writer, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(1, 17))
    with abc.client("c") as c:
        assert c.info("x/race")["versions"] == list(range(1, 17))


def test_watch_delivers_every_version_in_order(abc) -> None:
    seen: list[int] = []
    with abc.client("c") as c:
        c.put("x/watched", {"v": torch.tensor(0)})
        ready = threading.Event()

        def follow() -> None:
            with abc.client("c") as w:
                stream = w.watch("x/watched", timeout=15)
                ready.set()
                for version in stream:
                    seen.append(version)
                    if len(seen) == 6:
                        return

        t = threading.Thread(target=follow)
        t.start()
        ready.wait()
        time.sleep(0.3)
        for i in range(6):
            with abc.client("ab"[i % 2]) as w:
                w.put("x/watched", {"v": torch.tensor(i)})
        t.join(30)
    assert seen == [2, 3, 4, 5, 6, 7]


def test_replicate_to_another_node(abc) -> None:
    src = _tensors(3)
    with abc.client("a") as a, abc.client("c") as c:
        a.put("x/replicated", src)
        assert c.replicate("x/replicated", to="b") == {
            "node": "b",
            "name": "x/replicated",
            "version": 1,
            "device": "cpu",
        }
        assert sorted(r["node"] for r in c.info("x/replicated")["replicas"]) == ["a", "b"]
        assert c.replicate("x/replicated", to="b")["node"] == "b"  # idempotent
        with abc.client("b") as b, b.mount("x/replicated") as m:
            assert _equal(dict(m.tensors), src)  # a local, zero-copy replica on b now
        with pytest.raises(sdk.NotFound):
            c.replicate("x/replicated", to="nope")


def test_pull_through_cache_keeps_a_local_replica(etcd, fresh) -> None:
    a = fresh.start("pa")
    cache = fresh.start("pc", extra="[cache]\npull_through = true\n")
    src = _tensors(4)
    with a.client() as ca, cache.client() as cc:
        ca.put("x/pulled", src)
        assert _equal(cc.get("x/pulled", verify=True), src)
        assert sorted(r["node"] for r in cc.info("x/pulled")["replicas"]) == ["pa", "pc"]
        with cc.mount("x/pulled") as m:  # served from the local copy now
            assert _equal(dict(m.tensors), src)


def test_source_killed_during_a_get_never_gives_wrong_bytes(etcd, fresh) -> None:
    a, c = fresh.start("ka"), fresh.start("kc")
    fresh.start("kb")
    big = {f"t{i}": torch.randn(4 << 20) for i in range(8)}  # 128 MiB: a read takes a while
    with a.client() as ca, c.client() as cc:
        ca.put("x/big", big)
        cc.replicate("x/big", to="kb")
        outcome: list[object] = []

        def read() -> None:
            try:
                outcome.append(cc.get("x/big", verify=True))
            except sdk.TransferError as exc:
                outcome.append(exc)

        results = []
        for _ in range(2):  # one read against a live cluster, then one during the kill
            t = threading.Thread(target=read)
            t.start()
            if not results:
                t.join()
                results.append(outcome.pop())
                continue
            time.sleep(0.05)
            a.kill()
            t.join(120)
            results.append(outcome.pop())
        for result in results:
            assert isinstance(result, sdk.TransferError) or _equal(result, big)  # type: ignore[arg-type]
        assert _equal(results[0], big)  # type: ignore[arg-type]
        # b still serves it afterwards, and a's keys leave the registry within one lease TTL
        assert _equal(cc.get("x/big", verify=True), big)
        gone = _wait_for(lambda: all(r["node"] != "ka" for r in cc.info("x/big")["replicas"]), TTL + 3)
        assert "ka" not in {n["node"] for n in cc.nodes()}
        assert gone <= TTL + 3


def test_etcd_down_local_reads_go_on_and_the_cluster_recovers(etcd, fresh) -> None:
    a = fresh.start("ea")
    with a.client() as ca:
        ca.put("x/local", {"w": torch.ones(8)})
        etcd.stop(kill=True)
        try:
            assert torch.equal(ca.get("x/local")["w"], torch.ones(8))  # served from what a holds
            with ca.mount("x/local") as m:
                assert torch.equal(m.tensors["w"], torch.ones(8))
            with pytest.raises(sdk.Unavailable):
                ca.put("x/local", {"w": torch.zeros(8)})
        finally:
            etcd.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert ca.put("x/local", {"w": torch.zeros(8)}) == 2
                break
            except sdk.Unavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert ca.status()["reservations"] == 0


def test_a_daemon_restarted_with_the_same_node_id(etcd, fresh) -> None:
    a, c = fresh.start("ra"), fresh.start("rc")
    with c.client() as cc:
        with a.client() as ca:
            ca.put("x/restarted", {"w": torch.ones(4)})
        a.kill()
        a.start()  # same node id, same ports; the old incarnation's keys may linger for a TTL
        with pytest.raises((sdk.TransferError, sdk.NotFound)):
            cc.get("x/restarted")  # never old bytes from a new incarnation
        with a.client() as ca:
            assert ca.put("x/restarted", {"w": torch.full((4,), 2.0)}) == 2
        assert torch.equal(cc.get("x/restarted")["w"], torch.full((4,), 2.0))
        _wait_for(lambda: [r["node"] for r in cc.info("x/restarted", 1)["replicas"]] == [], TTL + 3)


def test_cli_shows_nodes_and_replicates(abc) -> None:
    from tests.daemons import tensord

    with abc.client("a") as a:
        a.put("x/cli", {"w": torch.ones(4)})
    out = tensord("nodes", socket=abc.nodes["c"].socket)
    assert out.returncode == 0, out.stderr
    # nodes killed by earlier tests may linger until their lease expires
    assert {line.split()[0] for line in out.stdout.splitlines()[1:]} >= {"a", "b", "c"}
    out = tensord("replicate", "x/cli", "--to", "b", socket=abc.nodes["c"].socket)
    assert out.returncode == 0 and "held on node b (cpu)" in out.stdout, out.stderr
    out = tensord("info", "x/cli", socket=abc.nodes["c"].socket)
    assert "replicas: a:cpu, b:cpu" in out.stdout or "replicas: b:cpu, a:cpu" in out.stdout
    out = tensord("--addr", abc.address("a"), "rm", "x/cli", socket=None)  # no token: refused
    assert out.returncode == 1 and "needs the daemon's token" in out.stderr
