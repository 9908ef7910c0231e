"""Real model shapes on GPU slabs: many-tensor sets through every operation and every pair of
devices (GPU slab / host slab / other GPU), both GPU copy engines, bulk fingerprints equal to
the CPU's, a corrupted byte caught. Run on a GPU host: `pytest -m gpu` (and `-m multigpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdk
from tensord_dataplane.fingerprint import fingerprint, fingerprints, slab_fingerprints
from tensord_dataplane.tensors import as_bytes
from tests.data import random_tensor

pytestmark = pytest.mark.gpu

_DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.int64, torch.bool, torch.uint8]


def _model(n: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 17))) if i % 500 else (1024, 700)
        if i % 997 == 3:
            shape = (0,)
        out[f"layers.{i // 256}.experts.{i % 256}.w"] = random_tensor(_DTYPES[i % len(_DTYPES)], shape, seed=i).to(
            device
        )
    return out


def _flat(tensors, names) -> torch.Tensor:
    return torch.cat([as_bytes(tensors[k].contiguous()).cpu() for k in names])


@pytest.fixture(params=["kernel", "triton", "driver"])
def engine(request, monkeypatch) -> str:
    monkeypatch.setenv("TENSORD_COPY_ENGINE", request.param)
    return str(request.param)


def test_bulk_fingerprints_are_the_same_on_cpu_and_gpu() -> None:
    rng = np.random.default_rng(1)
    sizes = np.array([0, 1, 7, 8, 255, 256, 257, 65536 + 5, *rng.integers(0, 5000, 300)], dtype=np.int64)
    aligned = (sizes + 255) // 256 * 256
    offsets = np.cumsum(aligned) - aligned
    cpu = torch.from_numpy(rng.integers(0, 256, int(aligned.sum()), dtype=np.uint8))
    gpu = cpu.to("cuda:0")
    assert slab_fingerprints(gpu, offsets, sizes).tolist() == slab_fingerprints(cpu, offsets, sizes).tolist()
    big = torch.randint(0, 255, (3 << 20 | 12345,), dtype=torch.uint8, device="cuda:0")
    assert fingerprint(big) == fingerprint(big.cpu())
    parts = [gpu[o : o + n] for o, n in zip(offsets.tolist(), sizes.tolist(), strict=True)]
    assert fingerprints(parts) == [fingerprint(p.cpu()) for p in parts]


def test_a_many_tensor_gpu_set_through_every_operation(client: sdk.Client, engine: str) -> None:
    src = _model(20_000, "cuda:0")
    names = list(src)
    expected = _flat(src, names)
    version = client.put(f"gpu/many-{engine}", src)
    assert client.info(f"gpu/many-{engine}")["device"] == "cuda:0"
    got = client.get(f"gpu/many-{engine}", verify=True)
    assert got[names[0]].device == torch.device("cuda:0") and torch.equal(_flat(got, names), expected)
    with client.mount(f"gpu/many-{engine}") as m:
        assert torch.equal(_flat(m.tensors, names), expected)
    targets = {k: torch.zeros_like(t) for k, t in src.items()}
    assert client.load_into(targets, f"gpu/many-{engine}", verify=True) == version
    assert torch.equal(_flat(targets, names), expected)
    on_cpu = {k: torch.zeros_like(t, device="cpu") for k, t in src.items()}  # through pinned windows
    client.load_into(on_cpu, f"gpu/many-{engine}", verify=True)
    assert torch.equal(_flat(on_cpu, names), expected)
    assert torch.equal(_flat(client.get(f"gpu/many-{engine}", device="cpu", verify=True), names), expected)
    sub = names[::3]
    assert torch.equal(_flat(client.get(f"gpu/many-{engine}", names=sub, verify=True), sub), _flat(src, sub))
    client.delete(f"gpu/many-{engine}")


def test_host_tensors_into_a_gpu_slab_and_a_host_slab_into_gpu_tensors(client: sdk.Client) -> None:
    src = _model(3_000, "cpu", seed=2)
    names = list(src)
    client.put("gpu/from-host", src, device="cuda:0")
    assert torch.equal(_flat(client.get("gpu/from-host", verify=True), names), _flat(src, names))
    client.put("gpu/host-slab", src)  # a host slab
    targets = {k: torch.zeros_like(t, device="cuda:0") for k, t in src.items()}
    client.load_into(targets, "gpu/host-slab", verify=True)
    assert torch.equal(_flat(targets, names), _flat(src, names))
    on_gpu = client.get("gpu/host-slab", device="cuda:0", verify=True)
    assert on_gpu[names[1]].device == torch.device("cuda:0") and torch.equal(_flat(on_gpu, names), _flat(src, names))
    gpu_src = {k: t.to("cuda:0") for k, t in src.items()}
    client.put("gpu/into-host", gpu_src, device="cpu")
    assert torch.equal(_flat(client.get("gpu/into-host", verify=True), names), _flat(src, names))


def test_a_corrupted_byte_in_a_gpu_slab_is_caught(client: sdk.Client) -> None:
    src = _model(2_000, "cuda:0", seed=3)
    fps = np.array(fingerprints(list(src.values())), dtype=np.uint64)
    specs = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in src.items()}
    with client.reserve("gpu/corrupt", specs, device="cuda:0") as r:
        r.write_all(src)
        spec = r.manifest.spec(1234)
        r.slab.finish()
        r.slab.base()[spec.offset + spec.nbytes - 1] ^= 0x40
        r.written_all(np.arange(len(src)), fps)
        r.commit()
    with pytest.raises(sdk.IntegrityError) as info:
        client.get("gpu/corrupt", verify=True)
    assert info.value.details["tensor"] == spec.name


@pytest.mark.multigpu
def test_many_tensors_onto_and_from_the_other_gpu(client: sdk.Client, engine: str) -> None:
    src = _model(10_000, "cuda:1", seed=4)
    names = list(src)
    client.put(f"gpu/peer-many-{engine}", src, device="cuda:0")  # gathered over NVLink
    got = client.get(f"gpu/peer-many-{engine}", device="cuda:1", verify=True)
    assert got[names[0]].device == torch.device("cuda:1") and torch.equal(_flat(got, names), _flat(src, names))
    targets = {k: torch.zeros_like(t) for k, t in src.items()}  # on cuda:1
    client.load_into(targets, f"gpu/peer-many-{engine}", verify=True)
    assert torch.equal(_flat(targets, names), _flat(src, names))
