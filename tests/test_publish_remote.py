"""Publications read from other nodes: real etcd, daemons on loopback with Mooncake TCP, host
tensors published by a process's own Transfer Engine and read one-sided (no copy anywhere)."""

from __future__ import annotations

import os
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
from tests.daemons import DaemonProcess, child_env, wait_gone
from tests.etcd_server import free_port
from tests.test_cluster import Cluster, _config, _wait_for

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")


@pytest.fixture(scope="module")
def ab(etcd, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(tmp_path_factory.mktemp("pubab"), etcd)
    for node in ("pa", "pb"):
        cluster.start(node)
    yield cluster
    cluster.stop()


def _shard(seed: int, n: int = 40, width: int = 7) -> dict[str, torch.Tensor]:
    """Mixed dtypes, each tensor its own allocation, in shuffled order."""
    from tests.data import random_tensor

    dtypes = [torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn, torch.int64]
    out = {f"layer{i}.w": random_tensor(dtypes[i % 5], (i % 13 + 1, width + i % 3), seed=seed + i) for i in range(n)}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0)
    keys = list(out)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    return {keys[i]: out[keys[i]] for i in order}


def _same(a, b) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a
    )


def test_a_host_publication_is_read_from_another_node_without_a_copy(ab) -> None:
    src = _shard(1)
    expected = {k: t.clone() for k, t in src.items()}
    with ab.client("pa") as pa, ab.client("pb") as pb:
        held_before = pa.status()["devices"]["cpu"]["used"]
        with pa.publish("pubr/host", src) as pub:
            info = pb.info("pubr/host")
            assert info["version"] == pub.version
            assert [(r["node"], r["device"]) for r in info["replicas"]] == [("pa", "cpu")]
            assert pa.status()["devices"]["cpu"]["used"] == held_before  # the daemon holds nothing
            got = pb.get("pubr/host")  # fingerprints checked by default
            assert _same(dict(got.items()), expected)
            target = {k: torch.zeros_like(t) for k, t in src.items()}
            assert pb.load_into(target, "pubr/host") == pub.version
            assert _same(target, expected)
            assert set(pb.get("pubr/host", names=["scalar"])) == {"scalar"}
            # a reader on the publisher's own node reads host memory the same way
            assert _same(dict(pa.get("pubr/host").items()), expected)
            with pytest.raises(sdk.InvalidArgument, match="mount"):
                pb.mount("pubr/host")
            assert pa.status()["pins"] == 0 and pb.status()["pins"] == 0
        wait_gone(pb, "pubr/host")
        with pytest.raises(sdk.NotFound):
            pb.get("pubr/host")


def test_a_host_publication_is_replicated_to_another_node(ab) -> None:
    src = _shard(2)
    expected = {k: t.clone() for k, t in src.items()}
    with ab.client("pa") as pa, ab.client("pb") as pb:
        with pa.publish("pubr/seed", src) as pub:
            pb.replicate("pubr/seed", to=["pb"])
            nodes = sorted(r["node"] for r in pb.info("pubr/seed")["replicas"])
            assert nodes == ["pa", "pb"]
            assert pb.status()["devices"]["cpu"]["used"] >= sum(t.nbytes for t in src.values())
        # withdrawn: the copy on pb stands, readable there without the publisher
        _wait_for(lambda: [r["node"] for r in pb.info("pubr/seed")["replicas"]] == ["pb"], 10)
        assert _same(dict(pb.get("pubr/seed", pub.version, verify=True).items()), expected)
        pb.delete("pubr/seed")


PUBLISHER = """
import sys, time
import sdk
from tests.test_publish_remote import _shard
client = sdk.Client(sys.argv[1])
src = {k: t.to(sys.argv[6]) for k, t in _shard(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])).items()}
pub = client.publish(sys.argv[2], src)
print(pub.version, flush=True)
time.sleep(600)
"""


def _publisher(
    socket: str, name: str, seed: int, n: int, width: int, device: str = "cpu", env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, socket, name, str(seed), str(n), str(width), device],
        stdout=subprocess.PIPE,
        text=True,
        env={**child_env(), **(env or {})},
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError("the publisher did not publish")
    return proc, int(line)


def test_a_publisher_killed_mid_read_never_yields_wrong_bytes(ab) -> None:
    """A reader on another node reads in a loop (checked and unchecked) while the publisher is
    SIGKILLed: every read returns the published bytes or fails with TransferError (NotFound
    once the version is gone)."""
    seed, n, width = 3, 200, 4000
    expected = _shard(seed, n, width)
    proc, version = _publisher(ab.nodes["pa"].socket, "pubr/killed", seed, n, width)
    outcomes = {"right": 0, "failed": 0, "gone": 0}
    try:
        with ab.client("pb") as pb:
            assert _same(dict(pb.get("pubr/killed", version).items()), expected)  # the engine started
            killer = threading.Timer(0.5, lambda: os.kill(proc.pid, signal.SIGKILL))
            killer.start()
            deadline = time.monotonic() + 60
            i = 0
            while time.monotonic() < deadline:
                i += 1
                try:
                    got = pb.get("pubr/killed", version, verify=None if i % 2 else False)
                except sdk.NotFound:
                    outcomes["gone"] += 1
                    break
                except sdk.TransferError:
                    outcomes["failed"] += 1
                    continue
                assert _same(dict(got.items()), expected), f"wrong bytes on read {i}"
                outcomes["right"] += 1
            killer.join()
            assert outcomes["right"] >= 1 and outcomes["gone"] == 1, outcomes
            wait_gone(pb, "pubr/killed")
            assert pb.status()["pins"] == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_unpublish_waits_for_a_remote_readers_pin_then_revokes(ab) -> None:
    from tests.frames import Raw

    src = _shard(4)
    with ab.client("pa") as pa, ab.client("pb") as pb:
        pub = pa.publish("pubr/pinned", src)
        reader = Raw(ab.nodes["pb"].socket)
        try:
            opened = reader.call("open", name="pubr/pinned")["result"]
            assert opened["replica"]["kind"] == "published" and opened["replica"]["node"] == "pa"
            assert pa.status()["pins"] == 1  # the gateway's pin, on the publisher's node
            done: list[bool] = []
            waiter = threading.Thread(target=lambda: done.append(pub.unpublish(timeout=30)))
            waiter.start()
            time.sleep(1.0)
            assert not done  # waits for the reader on the other node
            with pytest.raises(sdk.NotFound):  # withdrawn from new readers at once
                pb.get("pubr/pinned", pub.version)
            assert reader.call("release", pin=opened["pin"])["result"]["intact"] is True
            waiter.join(30)
            assert done == [True]
            # a reader that outstays the timeout learns that its pin was revoked
            pub2 = pa.publish("pubr/pinned", src)
            opened = reader.call("open", name="pubr/pinned", version=pub2.version)["result"]
            assert pub2.unpublish(timeout=0.2) is False
            assert reader.call("release", pin=opened["pin"])["result"]["intact"] is False
        finally:
            reader.close()
        assert pa.status()["pins"] == 0


def _with_state(cluster: Cluster, node: str, state: Path) -> DaemonProcess:
    cluster.ports.setdefault(node, free_port())
    config = _config(cluster.etcd, cluster.ports[node])
    d = DaemonProcess(cluster.workdir, node, config, env={"TENSORD_STATE_DIR": str(state)}).start()
    cluster.nodes[node] = d
    return d


def test_a_restarted_daemon_withdraws_its_publications(etcd, tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, etcd)
    try:
        a = _with_state(cluster, "pr-a", tmp_path / "state")
        cluster.start("pr-b")
        proc, version = _publisher(a.socket, "pubr/restart", 5, 20, 7)
        try:
            with cluster.client("pr-b") as b:
                assert _same(dict(b.get("pubr/restart", version).items()), _shard(5, 20, 7))
                a.kill()
                _with_state(cluster, "pr-a", tmp_path / "state")
                _wait_for(lambda: "pubr/restart" not in [s["name"] for s in b.ls()], 20)
                with pytest.raises(sdk.NotFound):
                    b.get("pubr/restart", version)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
    finally:
        cluster.stop()


def test_memory_shows_held_published_and_mapped_bytes(start_daemon) -> None:
    """One daemon (no etcd): a put held in a slab, a mount of it, a host publication. Status,
    info, the CLI and the metrics show each once: held by the daemon, mapped by a client (no
    copy), published in the publisher's memory (no copy)."""
    from tests.daemons import tensord
    from tests.test_metrics import scrape, value

    port = free_port()
    d = start_daemon("memshow", config=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    put = {"a": torch.ones(1000), "b": torch.zeros(300, dtype=torch.int64)}
    src = _shard(6)
    published = sum(t.nbytes for t in src.values())
    with d.client() as c:
        c.put("mem/held", put)
        cpu = c.status()["devices"]["cpu"]
        assert cpu["held"] >= 6400 and (cpu["published"], cpu["mapped"]) == (0, 0)
        with c.mount("mem/held") as m, c.publish("mem/pub", src) as pub:
            assert torch.equal(m.tensors["a"], put["a"])
            cpu = c.status()["devices"]["cpu"]
            assert (cpu["published"], cpu["mapped"]) == (published, 6400)
            assert cpu["used"] == cpu["held"]  # the publication and the mapping cost the daemon nothing
            info = c.info("mem/pub")
            assert info["published"] is True and info["version"] == pub.version
            assert c.info("mem/held")["mapped"] == 1 and c.info("mem/held")["published"] is False
            assert _same(dict(c.get("mem/pub").items()), src)  # host memory, read through the engine here too
            shown = tensord("status", socket=d.socket)
            assert shown.returncode == 0 and "PUBLISHED" in shown.stdout and "MAPPED" in shown.stdout, shown
            samples = scrape(port)
            assert value(samples, "tensord_device_published_bytes", device="cpu") == published
            assert value(samples, "tensord_device_mapped_bytes", device="cpu") == 6400
            assert value(samples, "tensord_device_held_bytes", device="cpu") == cpu["held"]
        cpu = c.status()["devices"]["cpu"]
        assert (cpu["published"], cpu["mapped"]) == (0, 0)


@pytest.mark.gpu
def test_a_gpu_publication_is_read_from_another_daemon_over_nvlink(tmp_path: Path) -> None:
    """Two daemons on one GPU host over `nvlink_intra`; a process publishes GPU tensors to node
    g0; a client of g1 reads them bit-exactly (get, load_into) one-sided from the publisher's
    memory; g0 holds no bytes for it."""
    from tests.etcd_server import start_etcd

    ok, why = available("nvlink_intra")
    if not ok:
        pytest.skip(f"no NVLink transport: {why}")
    etcd = start_etcd(tmp_path)
    nodes = []
    proc = None
    try:
        for node in ("g0", "g1"):
            config = (
                f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\n[registry]\n'
                f'etcd_endpoints = ["{etcd.endpoint}"]\n[transport]\nprotocol = "nvlink_intra"\n'
            )
            nodes.append(DaemonProcess(tmp_path, node, config).start())
        expected = {k: t.to("cuda:0") for k, t in _shard(7, 300, 2000).items()}
        proc, version = _publisher(nodes[0].socket, "nvpub/set", 7, 300, 2000, "cuda:0")
        with nodes[0].client() as c0, nodes[1].client() as c1:
            gpu = c0.status()["devices"]["cuda:0"]
            assert gpu["used"] == 0 and gpu["published"] == sum(t.nbytes for t in expected.values())
            got = c1.get("nvpub/set", version, device="cuda:0")
            assert _same(dict(got.items()), expected)
            target = {k: torch.empty_like(t) for k, t in expected.items()}
            assert c1.load_into(target, "nvpub/set", version) == version
            assert _same(target, expected)
            assert c0.status()["pins"] == 0
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]
        for d in nodes:
            d.kill()
        etcd.stop(kill=True)


def test_the_same_memory_published_twice_stays_readable_until_both_go(ab) -> None:
    """Two live publications of the same host tensors share their registration: withdrawing
    the first leaves the second readable from another node; withdrawing both unregisters."""
    src = _shard(8)
    with ab.client("pa") as pa, ab.client("pb") as pb:
        first = pa.publish("pubr/twice", src)
        second = pa.publish("pubr/twice", src)
        assert first.unpublish()
        assert _same(dict(pb.get("pubr/twice", second.version).items()), src)
        seeds = pa._seeds
        assert seeds is not None and seeds._uses  # still registered for the second
        assert second.unpublish()
        assert not seeds._uses and not seeds._idle  # host ranges go at once


def test_republishing_reuses_the_layout_only_while_it_is_what_describing_would_give(ab) -> None:
    """An RL engine publishes the same tensors after every update: the layout (table, places)
    is used again; every change to where or how a tensor lies is seen, and the reader on the
    other node gets exactly the published bytes each time (fingerprints checked)."""
    src = _shard(12)
    with ab.client("pa") as pa, ab.client("pb") as pb:

        def round_trip() -> None:
            with pa.publish("pubr/again", src) as pub:
                assert _same(dict(pb.get("pubr/again", pub.version).items()), src)
                target = {k: torch.zeros_like(t) for k, t in src.items()}
                assert pb.load_into(target, "pubr/again", pub.version) == pub.version
                assert _same(target, src)

        round_trip()
        kept = pa._layouts._kept["pubr/again"]
        src["layer3.w"].view(torch.uint8).add_(1)  # new bytes, same memory: the layout stays
        round_trip()
        assert pa._layouts._kept["pubr/again"] is kept
        changes = [
            lambda: src.__setitem__("layer4.w", src["layer4.w"].clone()),  # replaced: a new address
            lambda: src["layer5.w"].set_(torch.ones(3, 5, dtype=src["layer5.w"].dtype)),  # re-pointed in place
            lambda: src["layer6.w"].resize_(2, 2),  # resized in place
            lambda: src.__setitem__("layer7.w", src["layer7.w"].view(torch.uint8)),  # same bytes, another dtype
            lambda: src.__setitem__("layer8.w", src["layer8.w"].reshape(-1)),  # same bytes, another shape
            lambda: src.__setitem__("added", torch.arange(5.0)),  # another name
            lambda: src.pop("layer9.w"),  # one name fewer
        ]
        for change in changes:
            change()
            round_trip()
            assert pa._layouts._kept["pubr/again"] is not kept  # described afresh
            kept = pa._layouts._kept["pubr/again"]
        with pytest.raises(sdk.InvalidArgument, match="contiguous"):
            pa.publish("pubr/again", {**src, "t": torch.ones(3, 4).t()})
        assert pa._layouts._kept["pubr/again"] is kept


def test_seed_ranges_keep_gpu_allocations_registered_for_the_next_publication() -> None:
    """Counted registrations on the in-memory reference engine; host ranges go with their last
    publication (freed host memory may be unmapped)."""
    from tensord_dataplane.published import Registered, SeedRanges
    from tensord_dataplane.sources import places
    from tensord_dataplane.tensors import describe
    from tensord_dataplane.transport.memory import MemoryTransport

    src = _shard(9)
    p = places(describe(src.values(), copy_sparse=False), list(src))
    engine = MemoryTransport()
    seeds = SeedRanges(engine)
    a, b = Registered(seeds, p), Registered(seeds, p)
    assert len(engine._regs) == len(p.bases)
    a.close()
    a.close()  # idempotent
    assert len(engine._regs) == len(p.bases)
    b.close()
    assert len(engine._regs) == 0


@pytest.mark.gpu
def test_republishing_the_same_gpu_allocations_registers_nothing_new() -> None:
    """GPU ranges stay registered between publications of the same memory; an allocation freed
    and made anew (a new buffer id, maybe the same address) is registered again."""
    from tensord_dataplane.published import Registered, SeedRanges
    from tensord_dataplane.sources import places
    from tensord_dataplane.tensors import describe
    from tensord_dataplane.transport.memory import MemoryTransport

    class Counting(MemoryTransport):
        calls = 0

        def register(self, address: int, length: int) -> None:
            Counting.calls += 1
            super().register(address, length)

    src = {f"w{i}": torch.full((1 << 18,), float(i), device="cuda:0") for i in range(8)}
    engine = Counting()
    seeds = SeedRanges(engine)

    def publish(tensors: dict[str, torch.Tensor]) -> Registered:
        return Registered(seeds, places(describe(tensors.values(), copy_sparse=False), list(tensors)))

    publish(src).close()
    first = Counting.calls
    assert first >= 1 and len(engine._regs) == first  # kept, idle
    publish(src).close()
    assert Counting.calls == first  # nothing registered again
    del src
    torch.cuda.empty_cache()  # the allocations are freed; new ones may take the same addresses
    again = {f"w{i}": torch.full((1 << 18,), float(i), device="cuda:0") for i in range(8)}
    where = places(describe(again.values(), copy_sparse=False), list(again))
    publish(again).close()
    assert Counting.calls > first
    # exactly the allocations in use stay registered: the old ranges the allocator let go went
    # (ranges it kept, same buffer id, stay registered and count once)
    registered = {(seg.address, seg.length) for seg in engine._regs}
    assert registered == set(zip(where.bases.tolist(), where.sizes.tolist(), strict=True))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_publishing_host_tensors_copies_nothing(start_daemon) -> None:
    """The publisher's resident memory grows by far less than the set (no copy), and so does
    the daemon's held memory (none)."""
    d = start_daemon("nocopy")
    src = {f"w{i}": torch.randn(1 << 20) for i in range(16)}  # 64 MiB, 16 allocations
    nbytes = sum(t.nbytes for t in src.values())
    with d.client() as c:
        warm = {f"w{i}": torch.randn(1 << 20) for i in range(2)}
        c.publish("nocopy/warm", warm).unpublish()  # the engine and the fingerprint pool started
        before = _rss()
        with c.publish("nocopy/set", src):
            grown = _rss() - before
            # a copy would add 64 MiB; publishing adds a fixed ~8 MiB on this VM (engine metadata)
            assert grown < nbytes // 4, f"publishing {nbytes} bytes grew this process by {grown}"
            assert c.status()["devices"]["cpu"]["used"] == 0


def test_more_allocations_than_one_engine_advertises_are_spread_over_engines(ab, monkeypatch) -> None:
    """Mooncake hands a reader an engine's whole list of registered buffers in one handshake
    message of at most 1 MiB: a publisher with more allocations registers them with more engines
    (here 50 a engine), and readers on another node read each piece from its own engine."""
    import tensord_dataplane.published as published

    monkeypatch.setattr(published, "BUFFERS_PER_ENGINE", 50)
    src = _shard(21, n=130)
    expected = {k: t.clone() for k, t in src.items()}
    with ab.client("pa") as pa, ab.client("pb") as pb:
        with pa.publish("pubr/engines", src) as pub:
            seeds = pa._seeds
            assert seeds is not None and len(seeds.engines) == 3
            assert len({e.session for e in seeds.engines}) == 3 and max(seeds._held) <= 50
            assert _same(dict(pb.get("pubr/engines", pub.version).items()), expected)  # fingerprints checked
            target = {k: torch.zeros_like(t) for k, t in src.items()}
            assert pb.load_into(target, "pubr/engines", pub.version) == pub.version
            assert _same(target, expected)
            part = [k for k in src if k.startswith("layer1")]
            assert _same(dict(pb.get("pubr/engines", pub.version, names=part).items()), {k: expected[k] for k in part})
        assert not seeds._uses and sum(seeds._held) == 0  # host ranges go with the publication
        small = _shard(22, n=10)
        with pa.publish("pubr/engines", small) as pub:  # room in the first engine again: no new one
            assert len(seeds.engines) == 3 and seeds._held[0] == len(seeds._engine)
            assert _same(dict(pb.get("pubr/engines", pub.version).items()), small)


def test_a_publication_past_the_handshake_limit_is_read_from_another_node(ab) -> None:
    """20,000 host tensors, each its own allocation: one engine's buffer list would be over
    Mooncake's 1 MiB handshake message (every read from it failed); with the default of
    2,048 a engine they are read byte for byte from another node."""
    src = {f"t{i}": torch.full((3 + i % 5,), i, dtype=torch.int32) for i in range(20_000)}
    with ab.client("pa") as pa, ab.client("pb") as pb, pa.publish("pubr/many", src) as pub:
        assert pa._seeds is not None and len(pa._seeds.engines) >= 10
        got = pb.get("pubr/many", pub.version)
        assert len(got) == len(src) and all(torch.equal(got[k], t) for k, t in src.items())


@pytest.mark.parametrize("engines", [1, 2])
def test_pieces_of_adjacent_allocations_are_read_as_one_entry_each(engines: int) -> None:
    """Two allocations registered one by one that lie back to back (GPU allocations often do):
    a read of both must not merge them into one entry, which lies in neither registration
    (nvlink_intra refused it: "address not found"). The in-memory engine checks each entry
    lies in one registered range of the publisher, as Mooncake does."""
    import numpy as np

    from tensord_contract.descriptors import PublishedReplica
    from tensord_contract.manifest import Manifest, Table
    from tensord_dataplane.published import PublishedAccess
    from tensord_dataplane.transport.memory import MemoryTransport

    data = torch.arange(512, dtype=torch.int32).view(torch.uint8)[:512].clone()
    base = data.data_ptr()
    publishers = [MemoryTransport() for _ in range(engines)]
    publishers[0].register(base, 256)
    publishers[-1].register(base + 256, 256)
    more = tuple(p.session for p in publishers[1:])
    session_of = np.array([0, engines - 1], dtype="<u2").tobytes() if more else b""
    replica = PublishedReplica(
        "n", "cpu", publishers[0].session, (base, base + 256), (256, 256),
        np.array([0, 1], dtype="<u4").tobytes(), np.zeros(2, dtype="<u8").tobytes(), 512, 1,
        "published", more, session_of,
    )  # fmt: skip
    manifest = Manifest(
        "pubr/adjacent", 1, Table.build(["a", "b"], ["uint8"] * 2, [(256,), (256,)]), np.array([0, 256]), 512
    )
    reader = MemoryTransport()
    out = torch.zeros(512, dtype=torch.uint8)
    reader.register(out.data_ptr(), 512)
    PublishedAccess(replica, manifest, reader).read_registered(
        out.data_ptr() + manifest.offsets, manifest.offsets, manifest.sizes, "cpu"
    )
    assert torch.equal(out, data)


def test_publishing_the_same_layout_again_names_its_table_by_digest(ab, monkeypatch) -> None:
    """A kept layout's table goes by its digest; when the set's newest table is another one (a
    put of other tensors under the name meanwhile) the daemon asks for it, and the version is
    published all the same, read byte-exact from the other node."""
    from tensord_contract.table_messages import PublishRequest

    sent: list[bool] = []
    to_wire = PublishRequest.to_wire

    def spy(self: PublishRequest) -> dict:
        sent.append(self.by_digest)
        return to_wire(self)

    monkeypatch.setattr(PublishRequest, "to_wire", spy)
    src = _shard(21)
    with ab.client("pa") as pa, ab.client("pb") as pb:
        pa.publish("pubr/digest", src).unpublish()
        with pa.publish("pubr/digest", src) as pub:
            assert _same(dict(pb.get("pubr/digest", pub.version).items()), src)
        assert sent == [False, True]
        pa.put("pubr/digest", {"other": torch.ones(3)})
        with pa.publish("pubr/digest", src) as pub:
            assert _same(dict(pb.get("pubr/digest", pub.version).items()), src)
        assert sent == [False, True, True, False]  # the digest was not the newest table's
        with pytest.raises(sdk.InvalidArgument, match="keyed by name"):
            pa.publish("pubr/digest2", {1: torch.ones(2)})  # type: ignore[dict-item]
