"""Two nodes on one GPU host, bytes over Mooncake's intra-node NVLink transport: one per GPU
(`pytest -m multigpu`, two GPUs), or both on one GPU (`pytest -m gpu`); etcd and the CUDA
Mooncake wheel needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sdk
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.etcd_server import free_port, start_etcd

pytestmark = pytest.mark.gpu


@pytest.mark.multigpu
def test_get_from_the_other_gpu_over_nvlink(tmp_path: Path) -> None:
    g = torch.Generator(device="cuda:0").manual_seed(0)
    src = {f"w{i}": torch.randn(1 << 20, generator=g, device="cuda:0").bfloat16() for i in range(8)}
    with _two_nodes(tmp_path) as (c0, c1):
        c0.put("nv/set", src, device="cuda:0")
        got = c1.get("nv/set", device="cuda:1", verify=True)
        assert all(
            got[k].device == torch.device("cuda:1") and torch.equal(got[k].cpu(), t.cpu()) for k, t in src.items()
        )
        assert c1.replicate("nv/set", device="cuda:1")["device"] == "cuda:1"
        with c1.mount("nv/set") as m:
            assert all(torch.equal(m.tensors[k].cpu(), t.cpu()) for k, t in src.items())
        _many_tensors_into_several_allocations(c0, c1)


@contextlib.contextmanager
def _two_nodes(tmp_path: Path) -> Iterator[tuple[sdk.Client, sdk.Client]]:
    """Two daemons over nvlink_intra with real etcd, a client of each; skips without NVLink."""
    ok, why = available("nvlink_intra")
    if not ok:
        pytest.skip(f"no NVLink transport: {why}")
    etcd = start_etcd(tmp_path)
    nodes = []
    try:
        for node in ("g0", "g1"):
            config = (
                f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\n[registry]\n'
                f'etcd_endpoints = ["{etcd.endpoint}"]\n[transport]\nprotocol = "nvlink_intra"\n'
            )
            nodes.append(DaemonProcess(tmp_path, node, config).start())
        with nodes[0].client() as c0, nodes[1].client() as c1:
            yield c0, c1
    finally:
        for d in nodes:
            d.kill()
        etcd.stop(kill=True)


def _many_tensors_into_several_allocations(c0, c1) -> None:
    """The read that failed before coalescing respected registrations: ~1,000 tensors of 1 MiB
    from GPU 0, read by the other node into GPU 1 targets that fill four separate allocations
    back to back (neighbouring allocations often lie next to each other in address space)."""
    g = torch.Generator(device="cuda:0").manual_seed(1)
    src = {
        f"e{i}": torch.randint(0, 255, (1 << 20,), generator=g, device="cuda:0", dtype=torch.uint8) for i in range(1000)
    }
    c0.put("nv/many", src, device="cuda:0")
    got = c1.get("nv/many", device="cuda:1", verify=True)
    assert all(torch.equal(got[k].cpu(), t.cpu()) for k, t in src.items())
    pools = [torch.zeros(250 << 20, dtype=torch.uint8, device="cuda:1") for _ in range(4)]
    targets = {k: pools[i // 250][(i % 250) << 20 : ((i % 250) + 1) << 20] for i, k in enumerate(src)}
    c1.load_into(targets, "nv/many", verify=True)
    assert all(torch.equal(targets[k].cpu(), t.cpu()) for k, t in src.items())


def test_a_gpu_publication_over_several_engines_read_by_another_node(tmp_path: Path, monkeypatch) -> None:
    """Two nodes on one GPU over nvlink_intra: a publisher whose allocations fill three engines
    (16 a engine here; Mooncake caps one engine's buffer list at a 1 MiB handshake) is read
    byte for byte by a client of the other node, with get and load_into."""
    import tensord_dataplane.published as published

    monkeypatch.setattr(published, "BUFFERS_PER_ENGINE", 16)
    g = torch.Generator(device="cuda:0").manual_seed(2)
    # 12 MiB each: the caching allocator gives every one a cudaMalloc of its own
    src = {
        f"w{i}": torch.randint(0, 255, (12 << 20,), generator=g, device="cuda:0", dtype=torch.uint8) for i in range(40)
    }
    with _two_nodes(tmp_path) as (c0, c1), c0.publish("nv/pub", src, remote=True) as pub:
        assert c0._seeds is not None and len(c0._seeds.engines) == 3
        got = c1.get("nv/pub", pub.version)  # fingerprints checked by default
        assert all(torch.equal(got[k], t) for k, t in src.items())
        targets = {k: torch.zeros_like(t) for k, t in src.items()}
        assert c1.load_into(targets, "nv/pub", pub.version) == pub.version
        assert all(torch.equal(targets[k], t) for k, t in src.items())
