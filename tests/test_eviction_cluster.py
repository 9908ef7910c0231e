"""Eviction when a node pulls a copy from a peer (real etcd, Mooncake TE over TCP): a pull that
does not fit evicts versions that can come back, as a put does, and fails with nothing evicted
when that would not make room."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sdk
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.data import random_tensor, same_bits
from tests.test_eviction import MIB, _files
from tests.test_restore_cluster import _node as cluster_node
from tests.test_restore_cluster import etcd  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")


def _node(tmp_path: Path, etcd, node: str, budget: str) -> DaemonProcess:  # noqa: F811
    memory = f'[memory]\nbudgets = {{ cpu = "{budget}" }}\neviction = "lru"\nhuge_pages = false\n'
    return cluster_node(tmp_path, etcd, node, tmp_path / "models", None, memory)


def test_a_pull_from_a_peer_evicts_what_can_come_back(etcd, tmp_path: Path) -> None:  # noqa: F811
    files = _files(tmp_path, 3)  # 1 MiB each
    big = {"w": random_tensor(torch.float32, (2 * MIB // 4,), seed=7)}
    a = _node(tmp_path, etcd, "ea", "64MiB")
    b = _node(tmp_path, etcd, "eb", "4MiB")
    try:
        with a.client() as ca, b.client() as cb:
            for i, path in enumerate(files):
                assert cb.load_checkpoint(str(path), f"file/{i}") == 1
            cb.get("file/0")  # read last but one: file/1 is the least recently read
            cb.get("file/2")
            assert ca.put("big", big) == 1
            assert ca.put("huge", {"w": torch.zeros(5 * MIB // 4)}) == 1
            with pytest.raises(sdk.OutOfCapacity):  # 5 MiB never fits 4: nothing is evicted for it
                cb.replicate("huge", to="eb")
            assert cb.status()["evicted"] == 0
            assert cb.replicate("big", to="eb")["node"] == "eb"  # 3 + 2 MiB > 4: file/1 goes
            status = cb.status()
            assert status["evicted"] == 1 and status["devices"]["cpu"]["used"] <= 4 * MIB
            assert cb.info("file/1")["evicted"]
            assert sorted(r["node"] for r in cb.info("big")["replicas"]) == ["ea", "eb"]
            a.kill()  # the copy on eb stands on its own
            assert same_bits(cb.get("big", verify=True)["w"], big["w"])
            assert same_bits(cb.get("file/1", verify=True)["w"], load_file(files[1])["w"])  # back from its file
    finally:
        a.kill()
        b.kill()
