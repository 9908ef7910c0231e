"""Streaming replication between GPU slabs over NCCL pair groups (run on a host with two GPUs:
`pytest -m multigpu tests/test_fleet_gpu.py`). Two daemons with `transport.protocol = "nccl"`:
node a holds a set on cuda:0, node b pulls it onto cuda:1; the holder's GPU sends."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tensord_dataplane.tensors import as_bytes
from tests.daemons import DaemonProcess
from tests.etcd_server import free_port, start_etcd

pytestmark = pytest.mark.multigpu

TOKEN = "gpu-fleet"


def _config(endpoint: str, chunk: str) -> str:
    return (
        f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\ntoken = "{TOKEN}"\n'
        f'[registry]\netcd_endpoints = ["{endpoint}"]\nlease_ttl = 2\n'
        f'[transport]\nprotocol = "nccl"\n[fleet]\nchunk_bytes = "{chunk}"\nadvertise_seconds = 0.1\n'
    )


@pytest.fixture
def pair(tmp_path: Path):
    (tmp_path / "etcd").mkdir()
    etcd = start_etcd(tmp_path / "etcd")
    daemons = [DaemonProcess(tmp_path, n, _config(etcd.endpoint, "64MiB")).start(120) for n in ("a", "b")]
    yield daemons
    for d in daemons:
        d.kill()
    etcd.stop(kill=True)
    etcd.cleanup()


def _gpu_set(seed: int, gib: float) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda:0").manual_seed(seed)
    n = int(gib * 2**30) // 2 // 16
    return {f"w{i}": torch.randn(n + 13 * i, generator=g, device="cuda:0").to(torch.bfloat16) for i in range(16)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(as_bytes(a[k]).cpu(), as_bytes(b[k]).cpu()) for k in a)


def test_nccl_pair_group_moves_a_gpu_set_and_is_kept(pair) -> None:
    a, b = pair
    src = _gpu_set(1, 1.0)
    with a.client() as ca, b.client() as cb:
        ca.put("gpu/fleet", src, device="cuda:0")
        t0 = time.monotonic()
        assert cb.replicate("gpu/fleet", device="cuda:1")["device"] == "cuda:1"
        first = time.monotonic() - t0
        with cb.mount("gpu/fleet") as m:
            assert m.tensors["w0"].device == torch.device("cuda", 1)
            assert _same(dict(m.tensors), src)
        pairs = cb.status()["pairs"]
        assert pairs["created"] == 1 and pairs["groups"] == 1
        ca.put("gpu/fleet2", _gpu_set(2, 1.0), device="cuda:0")
        t0 = time.monotonic()
        cb.replicate("gpu/fleet2", device="cuda:1")
        again = time.monotonic() - t0
        assert cb.status()["pairs"]["created"] == 1  # the group made for the first set was kept
        assert again < first  # no second rendezvous (NCCL's setup is about a second)
        assert ca.status()["egress"]["chunks"] >= 2 * 2**30
        # the other way round (a's cuda:1 to b's cuda:0): NCCL binds a communicator to one GPU
        # on each side, so this pair of devices gets a group of its own (the first would fail)
        src3 = {k: v.to("cuda:1") for k, v in _gpu_set(3, 0.25).items()}
        ca.put("gpu/fleet3", src3, device="cuda:1")
        assert cb.replicate("gpu/fleet3", to=["b"], device="cuda:0")["nodes"]["b"]["device"] == "cuda:0"
        assert cb.status()["pairs"]["created"] == 2
        assert _same(dict(cb.get("gpu/fleet3", device="cuda:0")), src3)
