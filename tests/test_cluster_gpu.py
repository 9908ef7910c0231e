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
    with _two_nodes(tmp_path) as (c0, c1, _):
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
def _two_nodes(tmp_path: Path) -> Iterator[tuple[sdk.Client, sdk.Client, list[DaemonProcess]]]:
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
            yield c0, c1, nodes
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


def test_a_gpu_publication_over_several_engines_read_by_another_node(tmp_path: Path) -> None:
    """Two nodes on one GPU over nvlink_intra: a publisher process whose allocations fill
    several engines (8 a engine here; Mooncake caps one engine's buffer list at a 1 MiB
    handshake) is read byte for byte by a client of the other node, with get and load_into;
    small tensors come through spans of the publisher's allocations (`spans`). The publisher
    is a process of its own: CUDA IPC handles cannot be opened by the process that made them."""
    from tests.test_publish_remote import _publisher, _same, _shard

    expected = {k: t.to("cuda:0") for k, t in _shard(9, 60, 1 << 18).items()}
    with _two_nodes(tmp_path) as (_, c1, nodes):
        proc, version = _publisher(
            nodes[0].socket, "nv/pub", 9, 60, 1 << 18, "cuda:0", env={"TENSORD_ENGINE_BUFFERS": "8"}
        )
        try:
            pin, _, slab = c1._open("nv/pub", version)
            engines = len(slab._sessions)  # type: ignore[attr-defined]
            slab.close()
            c1._release(pin)
            assert engines >= 2, engines
            got = c1.get("nv/pub", version)  # fingerprints checked by default
            assert _same(dict(got.items()), expected)
            targets = {k: torch.zeros_like(t) for k, t in expected.items()}
            assert c1.load_into(targets, "nv/pub", version) == version
            assert _same(targets, expected)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()  # type: ignore[union-attr]


def test_a_reader_reads_memory_its_peer_registered_after_the_first_read(tmp_path: Path) -> None:
    """Over nvlink_intra the engine that reads keeps Mooncake's metadata cache on, so it knows a
    peer's memory as of its first read of that peer; a slab the peer registered later fails
    once and is read through a renewed engine (`mooncake_mover`)."""
    g = torch.Generator(device="cuda:0").manual_seed(3)
    first = {"x": torch.randint(0, 255, (1 << 20,), generator=g, device="cuda:0", dtype=torch.uint8)}
    later = {"y": torch.randint(0, 255, (96 << 20,), generator=g, device="cuda:0", dtype=torch.uint8)}
    with _two_nodes(tmp_path) as (c0, c1, _):
        c0.put("nv/first", first, device="cuda:0")
        assert torch.equal(c1.get("nv/first", device="cuda:0")["x"], first["x"])
        c0.put("nv/later", later, device="cuda:0")  # a block of its own, registered now
        for _ in range(2):
            assert torch.equal(c1.get("nv/later", device="cuda:0")["y"], later["y"])
        target = {"x": torch.zeros_like(first["x"])}
        c1.load_into(target, "nv/first")
        assert torch.equal(target["x"], first["x"])
