"""Fast ingest into GPU slabs: pinned staging ring, copies on CUDA streams. Needs a CUDA GPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from tensord.checkpoint import read_checkpoint
from tensord.cli.checkpoints import export_set, load_checkpoint, load_sharded
from tensord.ingest import ingest_into
from tensord.sharding import builtin_rules
from tensord_dataplane.fingerprint import BLOCK_BYTES, fingerprint
from tensord_dataplane.tensors import dtype_name
from tests.daemons import WEIGHTS, needs_minilm
from tests.test_ingest import MANY, _check_shards, _llama, _random, _same

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@needs_minilm
@pytest.mark.parametrize("threads", [1, 4])
def test_minilm_to_gpu(client, threads: int) -> None:
    load_checkpoint(client, WEIGHTS, f"gpu/minilm-{threads}", device="cuda:0", threads=threads)
    expected = load_file(WEIGHTS, device="cuda:0")
    got = client.get(f"gpu/minilm-{threads}", device="cuda:0", verify=True)
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert got[key].device.type == "cuda"
        assert torch.equal(got[key], t), key


def test_small_chunks_many_dtypes_to_gpu(client, tmp_path) -> None:
    expected = {f"t{i}.{dtype_name(d)}": _random(d, s, i) for i, (d, s) in enumerate(MANY)}
    path = tmp_path / "many.safetensors"
    save_file(expected, path)
    tensors = read_checkpoint(path)
    with client.reserve("gpu/many", {t.name: (t.dtype, t.shape) for t in tensors}, device="cuda:0") as r:
        fps = ingest_into(r.slab, r.manifest, tensors, threads=3, chunk_bytes=BLOCK_BYTES)
        assert fps == [fingerprint(expected[t.name]) for t in r.manifest.tensors]
        for spec, fp in zip(r.manifest.tensors, fps, strict=True):
            r.written(spec.name, fp)
        r.commit()
    got = client.get("gpu/many", device="cpu", verify=True)
    for key, t in expected.items():
        assert _same(got[key], t), key


def test_default_chunks_to_gpu_equal_load_file(client, tmp_path) -> None:
    path = tmp_path / "big.safetensors"
    save_file(
        {
            "big": _random(torch.bfloat16, (20 * MiB + 3,), 1),  # 40 MiB + 6 bytes
            "small": _random(torch.float32, (1000, 3), 2),
        },
        path,
    )
    load_checkpoint(client, path, "gpu/big", device="cuda:0", threads=4)
    expected = load_file(path, device="cuda:0")
    got = client.get("gpu/big", device="cuda:0", verify=True)
    for key, t in expected.items():
        assert _same(got[key], t), key  # bitwise: random bits include NaNs


def test_sharded_load_to_gpu(client, tmp_path) -> None:
    expected = _llama()
    path = tmp_path / "model.safetensors"
    save_file(expected, path)
    rules = builtin_rules("llama")
    load_sharded(client, path, "gpu/llama", tp=2, rules=rules, device="cuda:0")
    _check_shards(client, "gpu/llama", 2, rules, expected)


@needs_minilm
def test_export_from_gpu(client, tmp_path) -> None:
    load_checkpoint(client, WEIGHTS, "gpu/export", device="cuda:0")
    out = tmp_path / "out.safetensors"
    export_set(client, "gpu/export", out)
    expected, got = load_file(WEIGHTS), load_file(out)
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert _same(got[key], t), key


def test_cli_load_passes_the_file_to_a_gpu_slab(daemon, client, tmp_path) -> None:
    """`tensord load --device cuda:0` as typed: the daemon reads the passed file into GPU memory."""
    from tests.daemons import tensord

    expected = {f"t{i}.{dtype_name(d)}": _random(d, s, i) for i, (d, s) in enumerate(MANY)}
    path = tmp_path / "passed.safetensors"
    save_file(expected, path)
    out = tensord("load", str(path), "--name", "gpu/passed", "--device", "cuda:0", "--quiet", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert client.info("gpu/passed")["device"] == "cuda:0"
    got = client.get("gpu/passed", device="cuda:0", verify=True)
    for key, t in expected.items():
        assert torch.equal(got[key].cpu().view(-1).view(torch.uint8), t.view(-1).view(torch.uint8)), key


@pytest.mark.parametrize("chunk_bytes", [BLOCK_BYTES, None])
def test_every_rank_of_a_one_pass_load_to_gpu(client, tmp_path, chunk_bytes) -> None:
    """The ranks of a --tp load filled in one pass into GPU slabs: each group staged once, then
    one copy per rank; fingerprints computed on the GPU, every rank byte-exact."""
    from contextlib import ExitStack

    from tensord.ingest import ingest_ranks
    from tensord.sharding import plan_shards
    from tests.test_tp_onepass import RULES, SHAPES, _shards

    expected = {k: _random(d, s, i) for i, (k, (d, s)) in enumerate(SHAPES.items())}
    path = tmp_path / "odd.safetensors"
    save_file(expected, path)
    files, tp = read_checkpoint(path), 4
    plans = [plan_shards(files, rank, tp, RULES) for rank in range(tp)]
    names = [f"gpu/onepass-{chunk_bytes or 0}/tp{r}" for r in range(tp)]
    with ExitStack() as stack:
        rs = [
            stack.enter_context(client.reserve(n, {p.name: (p.dtype, p.shape) for p in ps}, device="cuda:0"))
            for n, ps in zip(names, plans, strict=True)
        ]
        ordered = [
            [{p.name: p for p in ps}[t.name] for t in r.manifest.tensors] for ps, r in zip(plans, rs, strict=True)
        ]
        got = ingest_ranks([r.slab for r in rs], [r.manifest for r in rs], ordered, threads=3, chunk_bytes=chunk_bytes)
        want = _shards(expected, RULES, tp)
        for rank, r in enumerate(rs):
            assert got.fingerprints[rank] == [fingerprint(want[rank][t.name]) for t in r.manifest.tensors]
            for spec, fp in zip(r.manifest.tensors, got.fingerprints[rank], strict=True):
                r.written(spec.name, fp)
            r.commit()
    for rank, n in enumerate(names):
        shard = client.get(n, device="cpu", verify=True)
        for key, t in want[rank].items():
            assert _same(shard[key], t), (rank, key)
