"""A `load_into` from another node: one-sided Transfer Engine reads of whole windows of the slab
into a registered staging buffer kept between reads (two halves: the engine fills one while the
batched copy scatters the other), the copy plan reused across versions. Two daemons, real etcd,
Mooncake TCP on loopback; windows made small here so that a small set crosses many."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sdk
from sdk.plans import LoadPlan
from tensord_dataplane import remote
from tensord_dataplane.tensors import as_bytes
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.data import random_tensor
from tests.etcd_server import EtcdServer, free_port
from tests.test_cluster import Cluster, _config

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")


@pytest.fixture(scope="module")
def ab(etcd: EtcdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("ab"), etcd)
    for node in "ab":
        cluster.start(node)
    yield cluster
    cluster.stop()


def _set(seed: int, n: int = 600) -> dict[str, torch.Tensor]:
    dtypes = [torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn]
    return {f"e.{i}": random_tensor(dtypes[i % 4], (i % 40 + 1, 7), seed=seed * 10_000 + i) for i in range(n)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(as_bytes(a[k]), as_bytes(b[k])) for k in a)


def test_remote_load_into_through_many_windows(ab: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "_WINDOW", 16 << 10)  # ~40 windows: both halves, many times
    with ab.client("a") as a, ab.client("b") as b:
        targets = {k: torch.zeros_like(t) for k, t in _set(0).items()}
        plan = None
        for step in range(3):
            src = _set(step)
            version = a.put("remote/windows", src)
            assert b.load_into(targets, "remote/windows", verify=True) == version
            assert _same(targets, src)
            kept = b._plans.get("load", "remote/windows")
            assert isinstance(kept, LoadPlan) and (plan is None or kept is plan)
            plan = kept
        # a target re-allocated between reads: the plan is made again, the old memory untouched
        old = targets["e.5"]
        targets["e.5"] = torch.zeros_like(old)
        before = old.clone()
        src = _set(7)
        a.put("remote/windows", src)
        b.load_into(targets, "remote/windows")
        assert _same(targets, src) and torch.equal(old, before)
        assert b._plans.get("load", "remote/windows") is not plan
        assert a.status()["pins"] == 0 and b.status()["pins"] == 0


def test_two_threads_read_from_another_node_at_once(ab: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "_WINDOW", 16 << 10)
    src = _set(3)
    errors: list[BaseException] = []
    with ab.client("a") as a, ab.client("b") as b:
        a.put("remote/threads", src)

        def load() -> None:
            try:
                mine = {k: torch.zeros_like(t) for k, t in src.items()}
                for _ in range(3):
                    b.load_into(mine, "remote/threads")
                    assert _same(mine, src)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not errors, errors[0]


def test_windows_grow_with_the_read_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sixteenth of the read, from 256 MiB to 1 GiB (an engine call costs ~0.5 ms beyond its
    bytes; two windows stay staged); TENSORD_REMOTE_WINDOW_MB fixes it."""
    monkeypatch.delenv("TENSORD_REMOTE_WINDOW_MB", raising=False)
    assert remote.window_for(0) == remote.window_for(4 << 30) == 256 << 20
    assert remote.window_for(8 << 30) == 512 << 20
    assert remote.window_for(20 << 30) == remote.window_for(1 << 40) == 1 << 30
    monkeypatch.setenv("TENSORD_REMOTE_WINDOW_MB", "64")
    assert remote.window_for(20 << 30) == 64 << 20


def test_a_node_exposes_no_more_ranges_than_one_engine_can_advertise(etcd: EtcdServer, tmp_path: Path) -> None:
    """Past TENSORD_ENGINE_BUFFERS registered ranges (Mooncake hands a reader an engine's list in
    one message of at most 1 MiB: beyond it every reader's handshake fails), a node keeps further
    slabs unexposed: readable on that node, refused to other nodes with a clear error, while the
    exposed ones stay readable from everywhere; a deleted set's range makes room again."""
    cluster = Cluster(tmp_path, etcd)
    try:
        cluster.ports["a"] = free_port()
        cluster.nodes["a"] = DaemonProcess(
            tmp_path, "a", _config(etcd, cluster.ports["a"], ""), env={"TENSORD_ENGINE_BUFFERS": "3"}
        ).start()
        cluster.start("b")
        sets = {f"lim/s{i}": _set(i, 20) for i in range(5)}
        with cluster.client("a") as a, cluster.client("b") as b:
            for name, tensors in sets.items():
                a.put(name, tensors)
            for name in list(sets)[:3]:
                assert _same(b.get(name), sets[name])
            for name in list(sets)[3:]:
                assert _same(a.get(name), sets[name])  # on its node
                with pytest.raises(sdk.TransferError, match="does not expose"):
                    b.get(name)
            a.delete("lim/s0")
            a.put("lim/s5", _set(5, 20))
            assert _same(b.get("lim/s5"), _set(5, 20))
    finally:
        cluster.stop()
