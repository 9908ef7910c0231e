"""Two nodes on one GPU host, one per GPU, bytes over Mooncake's intra-node NVLink transport.

Run on a host with two GPUs, etcd and the CUDA Mooncake wheel: `pytest -m multigpu`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.etcd_server import free_port, start_etcd

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]


def test_get_from_the_other_gpu_over_nvlink(tmp_path: Path) -> None:
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
        g = torch.Generator(device="cuda:0").manual_seed(0)
        src = {f"w{i}": torch.randn(1 << 20, generator=g, device="cuda:0").bfloat16() for i in range(8)}
        with nodes[0].client() as c0, nodes[1].client() as c1:
            c0.put("nv/set", src, device="cuda:0")
            got = c1.get("nv/set", device="cuda:1", verify=True)
            assert all(
                got[k].device == torch.device("cuda:1") and torch.equal(got[k].cpu(), t.cpu()) for k, t in src.items()
            )
            assert c1.replicate("nv/set", device="cuda:1")["device"] == "cuda:1"
            with c1.mount("nv/set") as m:
                assert all(torch.equal(m.tensors[k].cpu(), t.cpu()) for k, t in src.items())
            _many_tensors_into_several_allocations(c0, c1)
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
