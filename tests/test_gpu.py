"""GPU slabs: CUDA IPC export, mounts from other processes, copies onto the other GPU.

Run on a GPU host with `pytest -m gpu` (and `-m multigpu` for two GPUs).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sdk
from tensord_dataplane.fingerprint import fingerprint
from tests.daemons import child_env

pytestmark = pytest.mark.gpu


def _llm_like(device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {
        "embed": torch.randn(1024, 256, generator=g, device=device).bfloat16(),
        "q_proj": torch.randn(256, 256, generator=g, device=device).bfloat16(),
        "norm": torch.randn(256, generator=g, device=device),
        "scale": torch.tensor(0.5, device=device).to(torch.float8_e4m3fn),
        "empty": torch.empty(0, 4, device=device),
        "ids": torch.arange(33, device=device),
    }


def test_fingerprint_is_the_same_on_cpu_and_gpu() -> None:
    for t in _llm_like("cuda:0").values():
        assert fingerprint(t) == fingerprint(t.cpu())
    big = torch.randint(0, 255, (3 << 20 | 12345,), dtype=torch.uint8, device="cuda:0")
    assert fingerprint(big) == fingerprint(big.cpu())


@pytest.mark.parametrize("version", [2, 3])
def test_bulk_fingerprints_in_place_match_one_by_one(version: int) -> None:
    """The in-place kernel (1 MiB pieces, the last partial word) against the definition, on
    sizes around its edges; unaligned tensors take the gathered path."""
    from tensord_dataplane.fingerprint import fingerprints

    raw = torch.randint(0, 256, (5 << 20,), dtype=torch.uint8, device="cuda:0")
    tensors = [raw[: (1 << 20) * k + extra] for k in (0, 1, 2, 4) for extra in (0, 1, 7, 8, 255, 256, 257)]
    tensors += [raw[8:16], raw[3:1000], raw[1 : (2 << 20) + 5], raw[:0], torch.randn(33, 7, device="cuda:0")]
    tensors += [torch.randn(1000 + i, device="cuda:0").bfloat16() for i in range(20)]
    assert fingerprints(tensors, version=version) == [fingerprint(t.cpu(), version=version) for t in tensors]


@pytest.mark.parametrize("version", [2, 3])
def test_slab_fingerprints_on_a_gpu_match_the_host(version: int) -> None:
    """A slab on a GPU (put, pulls, restores) is fingerprinted where it lies: the same values as
    the same bytes on the host."""
    from tensord_dataplane.fingerprint import slab_fingerprints

    sizes = np.array([0, 1, 7, 8, 255, 256, 257, 1 << 20, (2 << 20) + 5, 12345], dtype=np.int64)
    offsets = np.cumsum((sizes + 255) // 256 * 256) - (sizes + 255) // 256 * 256
    buf = torch.randint(0, 256, (int(offsets[-1] + sizes[-1] + 255) // 256 * 256,), dtype=torch.uint8, device="cuda:0")
    gpu = slab_fingerprints(buf, offsets, sizes, version=version)
    assert gpu.tolist() == slab_fingerprints(buf.cpu(), offsets, sizes, version=version).tolist()


def test_cuda_slab_round_trip(client: sdk.Client) -> None:
    src = _llm_like("cuda:0")
    version = client.put("gpu/set", src)  # default: where the tensors are
    info = client.info("gpu/set")
    assert info["device"] == "cuda:0"
    got = client.get("gpu/set", verify=True)
    for k, t in src.items():
        assert got[k].device == torch.device("cuda:0") and torch.equal(got[k].cpu(), t.cpu()), k
    on_cpu = client.get("gpu/set", device="cpu")
    assert all(torch.equal(on_cpu[k], t.cpu()) for k, t in src.items())
    with client.mount("gpu/set") as m:
        assert m.version == version
        assert all(m.tensors[k].device == torch.device("cuda:0") for k in src)
        assert all(torch.equal(m.tensors[k], t) for k, t in src.items())
    status = client.status()
    assert status["devices"]["cuda:0"]["used"] > 0


def test_cpu_tensors_into_a_cuda_slab_and_back(client: sdk.Client) -> None:
    src = {k: t.cpu() for k, t in _llm_like("cuda:0", seed=1).items()}
    client.put("gpu/from-cpu", src, device="cuda:0")
    got = client.get("gpu/from-cpu", device="cpu", verify=True)
    assert all(torch.equal(got[k], t) for k, t in src.items())


CHILD = """
import sys, sdk, torch
from tensord_dataplane.fingerprint import fingerprint
with sdk.Client(sys.argv[1]).mount(sys.argv[2]) as m:
    print(" ".join(f"{k}={fingerprint(t)}" for k, t in sorted(m.tensors.items())), flush=True)
    if len(sys.argv) > 3:
        import time; time.sleep(600)
"""


def _child(daemon, name: str, hold: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, "-c", CHILD, daemon.socket, name] + (["hold"] if hold else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=child_env())


def test_ipc_mount_from_another_process(daemon, client: sdk.Client) -> None:
    src = _llm_like("cuda:0", seed=2)
    client.put("gpu/ipc", src)
    with _child(daemon, "gpu/ipc") as child:
        out, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    expected = " ".join(f"{k}={fingerprint(t)}" for k, t in sorted(src.items()))
    assert out.strip() == expected


def test_gpu_mount_released_when_its_process_is_killed(daemon, client: sdk.Client) -> None:
    client.put("gpu/killed", _llm_like("cuda:0"))
    with _child(daemon, "gpu/killed", hold=True) as child:
        assert child.stdout is not None and child.stdout.readline()
        assert client.info("gpu/killed")["pins"] == 1
        child.send_signal(signal.SIGKILL)
        child.wait()
    import time

    deadline = time.monotonic() + 10
    while client.info("gpu/killed")["pins"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.info("gpu/killed")["pins"] == 0


def test_daemon_ignores_expandable_segments(start_daemon) -> None:
    d = start_daemon("expandable", env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    with d.client() as c:
        c.put("gpu/exp", {"x": torch.ones(1 << 20, device="cuda:0")})
        with c.mount("gpu/exp") as m:
            assert float(m.tensors["x"].sum()) == float(1 << 20)


@pytest.mark.multigpu
def test_get_and_load_into_the_other_gpu(client: sdk.Client) -> None:
    src = _llm_like("cuda:0", seed=3)
    client.put("gpu/peer", src)
    got = client.get("gpu/peer", device="cuda:1", verify=True)
    assert all(got[k].device == torch.device("cuda:1") and torch.equal(got[k].cpu(), t.cpu()) for k, t in src.items())
    target = {k: torch.zeros_like(t, device="cuda:1") for k, t in src.items()}
    client.load_into(target, "gpu/peer", verify=True)
    assert all(torch.equal(target[k].cpu(), t.cpu()) for k, t in src.items())


@pytest.mark.multigpu
def test_slab_on_the_second_gpu(client: sdk.Client) -> None:
    src = _llm_like("cuda:1", seed=4)
    client.put("gpu/second", src)
    assert client.info("gpu/second")["device"] == "cuda:1"
    with client.mount("gpu/second") as m:
        assert all(m.tensors[k].device == torch.device("cuda:1") for k in src)
        assert all(torch.equal(m.tensors[k], t) for k, t in src.items())


def test_ipc_mappings_kept_then_closed(client: sdk.Client, monkeypatch) -> None:
    """A read keeps its mapping for the next one; the daemon reuses a freed allocation for the
    next version of the same size, which reads right through the kept mapping; idle mappings
    close; TENSORD_IPC_KEEP_SECONDS=0 keeps none."""
    from tensord_dataplane.ipc import mappings

    def version(seed: int) -> dict[str, torch.Tensor]:  # a size no other test uses
        g = torch.Generator(device="cuda:0").manual_seed(seed)
        return {"w": torch.randn(3_000_017, generator=g, device="cuda:0"), "b": torch.arange(seed, device="cuda:0")}

    def idle() -> int:
        return int(client.status()["devices"]["cuda:0"]["idle"])

    mappings.clear()
    monkeypatch.setenv("TENSORD_IPC_KEEP_SECONDS", "0.5")
    first = version(7)
    client.put("gpu/ipc", first)
    client.get("gpu/ipc")
    got = client.get("gpu/ipc")
    assert mappings.kept() == 1 and all(torch.equal(got[k], t) for k, t in first.items())
    for seed in (8, 9):
        before = idle()
        client.delete("gpu/ipc")
        freed = idle() - before
        assert freed >= 12_000_000  # kept for reuse, not given back
        nxt = version(seed)
        client.put("gpu/ipc", nxt)
        assert idle() <= before + freed - 12_000_000  # taken again
        got = client.get("gpu/ipc", verify=True)
        assert all(torch.equal(got[k], t) for k, t in nxt.items()), seed
        assert mappings.kept() == 1  # the same block: read through the kept mapping
    deadline = time.monotonic() + 5
    while mappings.kept() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mappings.kept() == 0  # closed by the timer after 0.5 s idle
    monkeypatch.setenv("TENSORD_IPC_KEEP_SECONDS", "0")
    client.get("gpu/ipc")
    assert mappings.kept() == 0
    monkeypatch.setenv("TENSORD_IPC_KEEP_SECONDS", "soon")
    with pytest.raises(sdk.InvalidArgument, match="TENSORD_IPC_KEEP_SECONDS"):
        client.get("gpu/ipc")


def test_idle_blocks_go_back_to_the_driver_when_memory_runs_out(client: sdk.Client) -> None:
    """A freed slab's block is kept for reuse; a bigger slab that fits only without it gets it
    back from the driver (the daemon trims its idle blocks) instead of failing."""

    def gib(fraction: float) -> int:
        return int(free0 * fraction) // 4096 * 4096

    torch.cuda.empty_cache()
    free0 = torch.cuda.mem_get_info(0)[0]
    src = torch.randint(0, 255, (gib(0.25),), dtype=torch.uint8, device="cuda:0")
    client.put("gpu/idle-a", {"x": src})
    del src
    client.delete("gpu/idle-a")
    assert client.status()["devices"]["cuda:0"]["idle"] >= gib(0.25)
    big = torch.randint(0, 255, (gib(0.3),), dtype=torch.uint8, device="cuda:0")
    torch.cuda.empty_cache()
    filler = torch.empty(torch.cuda.mem_get_info(0)[0] - gib(0.2), dtype=torch.uint8, device="cuda:0")
    client.put("gpu/idle-b", {"x": big})  # fits only once the idle block went back
    del filler
    torch.cuda.empty_cache()
    assert client.status()["devices"]["cuda:0"]["idle"] == 0
    expected = fingerprint(big)
    del big
    torch.cuda.empty_cache()
    assert fingerprint(client.get("gpu/idle-b", verify=True)["x"]) == expected
    client.delete("gpu/idle-b")
