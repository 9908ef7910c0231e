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
from tests.daemons import child_env, wait_gone
from tests.test_cluster import Cluster, _wait_for

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")


@pytest.fixture(scope="module")
def ab(etcd, tmp_path_factory: pytest.TempPathFactory):
    cluster = Cluster(tmp_path_factory.mktemp("pubab"), etcd)
    for node in ("pa", "pb"):
        cluster.start(node)
    yield cluster
    cluster.stop()


def _shard(seed: int, n: int = 40) -> dict[str, torch.Tensor]:
    """Mixed dtypes, each tensor its own allocation, in shuffled order."""
    from tests.data import random_tensor

    dtypes = [torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn, torch.int64]
    out = {f"layer{i}.w": random_tensor(dtypes[i % 5], (i % 13 + 1, 7 + i % 3), seed=seed + i) for i in range(n)}
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0)
    keys = list(out)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    return {keys[i]: out[keys[i]] for i in order}


def _same(a, b) -> bool:
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(as_bytes(a[k]), as_bytes(b[k]))
        for k in a
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
