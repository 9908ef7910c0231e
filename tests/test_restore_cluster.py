"""Restore in a cluster (real etcd, Mooncake TE over TCP): a restarted node copies back what a
live peer still holds, reads its checkpoints again for the rest, and reports the others lost;
versions stay as etcd has them. SIGKILL on one node, SIGTERM on the other."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdk
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.data import random_tensor, same_bits
from tests.etcd_server import free_port, start_etcd
from tests.test_metrics import scrape, value
from tests.test_restore import wait_restored

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")

TOKEN = "restore-secret"


@pytest.fixture
def etcd(tmp_path: Path):
    (tmp_path / "etcd").mkdir()
    server = start_etcd(tmp_path / "etcd")
    yield server
    server.stop(kill=True)
    server.cleanup()


def _node(tmp_path: Path, etcd, node: str, models: Path, metrics: int | None, extra: str = "") -> DaemonProcess:
    """A node of an etcd cluster over TCP, its state in tmp_path/node; `extra`: more config."""
    config = (
        f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\ntoken = "{TOKEN}"\nstate_dir = "{tmp_path / node}"\n'
        f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = 10\n'
        f'[transport]\nprotocol = "tcp"\n[ingest]\nallowed_roots = ["{models}"]\n'
        + ("" if metrics is None else f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n')
        + extra
    )
    return DaemonProcess(tmp_path / "daemons", node, config).start()


def _same(got, want) -> bool:
    return set(got) == set(want) and all(same_bits(got[k], want[k]) for k in want)


def test_a_restarted_node_restores_from_its_peer_and_its_files(etcd, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    save_file({"w": random_tensor(torch.bfloat16, (300, 70), seed=1), "b": torch.arange(9)}, models / "f.safetensors")
    from_file = load_file(models / "f.safetensors")
    shared = {f"t{i}": random_tensor(torch.float32, (1000 + i,), seed=10 + i) for i in range(20)}
    ports = {"ra": free_port(), "rb": free_port()}
    a = _node(tmp_path, etcd, "ra", models, ports["ra"])
    b = _node(tmp_path, etcd, "rb", models, ports["rb"])
    try:
        with a.client() as ca, b.client() as cb:
            assert ca.load_checkpoint(str(models / "f.safetensors"), "c/file") == 1  # only on ra
            assert ca.put("c/shared", {"x": torch.zeros(3)}) == 1
            assert ca.put("c/shared", shared) == 2
            assert cb.replicate("c/shared", 2)["node"] == "rb"  # v2 on ra and rb
            assert ca.put("c/lonely", {"x": torch.ones(5)}) == 1  # a put only ra holds

        b.kill()  # SIGKILL: rb copies v2 back from ra
        a.proc.send_signal(signal.SIGSTOP)  # ra answers nothing for a while (its lease holds)
        try:
            b.start()
            with b.client() as cb:  # and rb serves meanwhile, saying so
                restore = cb.status()["restore"]
                assert restore["state"] == "running" and restore["pending"] + restore["running"] == 1, restore
                assert [s["name"] for s in cb.ls()] == ["c/file", "c/lonely", "c/shared"]
            t0 = time.monotonic()
            assert b.stop() == 0 and time.monotonic() - t0 < 10  # SIGTERM mid-restore: it stops now
            b.start()  # and the next start restores it all the same
        finally:
            a.proc.send_signal(signal.SIGCONT)
        with b.client() as cb:
            restore = wait_restored(cb)
            assert restore["restored"] == 1 and restore["lost"] == 0, restore
            assert sorted(r["node"] for r in cb.info("c/shared", 2)["replicas"]) == ["ra", "rb"]
            with cb.mount("c/shared", 2) as m:  # a local replica again
                assert _same(dict(m.tensors), shared)
        metrics = scrape(ports["rb"])
        assert value(metrics, "tensord_restores_total", outcome="peer") == 1
        assert value(metrics, "tensord_etcd_lease_up") == 1

        assert a.stop() == 0  # SIGTERM: ra copies v2 back from rb, reads its file again
        a.start()
        with a.client() as ca:
            restore = wait_restored(ca)
            assert restore["restored"] == 2 and restore["lost"] == 2, restore  # puts only ra held
            lost = {(x["name"], x["version"]): x["reason"] for x in restore["lost_versions"]}
            assert set(lost) == {("c/lonely", 1), ("c/shared", 1)} and "no peer gave it" in lost[("c/lonely", 1)]
            with ca.mount("c/shared") as m:
                assert m.version == 2 and _same(dict(m.tensors), shared)
            with ca.mount("c/file") as m:
                assert _same(dict(m.tensors), from_file)
            assert ca.info("c/shared")["versions"] == [1, 2]  # v1 is lost, not gone: etcd keeps it
            with pytest.raises((sdk.NotFound, sdk.TransferError)):
                ca.get("c/lonely")
            assert ca.put("c/lonely", {"x": torch.zeros(5)}) == 2  # etcd's counter goes on
        metrics = scrape(ports["ra"])
        assert value(metrics, "tensord_restores_total", outcome="peer") == 1
        assert value(metrics, "tensord_restores_total", outcome="checkpoint") == 1
        assert value(metrics, "tensord_restores_total", outcome="lost") == 2
        assert value(metrics, "tensord_bytes_total", path="ingest", direction="write") > 0
    finally:
        a.kill()
        b.kill()
