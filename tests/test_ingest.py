"""Fast ingest: checkpoint files into slabs (chunked, threaded), sharding on load, export."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tensord.checkpoint import read_checkpoint
from tensord.cli.checkpoints import export_set, load_checkpoint, load_sharded
from tensord.ingest import Ingested, Progress, ingest_into, load
from tensord.sharding import ShardRules, builtin_rules, plan_shards
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest, Table
from tensord_dataplane.fingerprint import BLOCK_BYTES, fingerprint
from tensord_dataplane.gpu import GpuAccess
from tensord_dataplane.host import HostAccess
from tensord_dataplane.tensors import dtype_name
from tests.daemons import WEIGHTS, needs_minilm, tensord
from tests.data import random_tensor as _random
from tests.data import same_bits as _same

MiB = 1 << 20


#: (dtype, shape): odd sizes, sizes above the test chunk (BLOCK_BYTES) and not multiples of it,
#: empty and 0-d tensors.
MANY = [
    (torch.float32, (3 * BLOCK_BYTES // 4 + 5,)),  # 3 chunks + 20 bytes
    (torch.bfloat16, (1000, 1031)),
    (torch.float16, (7,)),
    (torch.float64, (BLOCK_BYTES // 8,)),  # exactly one chunk
    (torch.int8, (BLOCK_BYTES + 1,)),
    (torch.uint8, (3, 5, 7)),
    (torch.int16, (513, 1023)),
    (torch.uint16, (11,)),
    (torch.int32, (300_001,)),
    (torch.uint32, (2, 2)),
    (torch.int64, ()),
    (torch.uint64, (65537,)),
    (torch.bool, (1001,)),
    (torch.complex64, (100_003,)),
    (torch.float8_e4m3fn, (2 * BLOCK_BYTES + 3,)),
    (torch.float8_e5m2, (17, 19)),
    (torch.float8_e4m3fnuz, (5,)),
    (torch.float8_e5m2fnuz, (6,)),
    (torch.float32, (0, 4)),
]


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {f"t{i}.{dtype_name(d)}": _random(d, s, i) for i, (d, s) in enumerate(MANY)}
    path = tmp_path_factory.mktemp("many") / "many.safetensors"
    save_file(tensors, path)
    return path, tensors


def _check_set(client, name: str, expected: dict[str, torch.Tensor]) -> None:
    got = client.get(name, verify=True)
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert _same(got[key], t), key
    with client.mount(name) as m:
        for spec in m.manifest.tensors:
            assert spec.fingerprint == fingerprint(expected[spec.name]), spec.name


# -- real weights -----------------------------------------------------------------------------


@needs_minilm
@pytest.mark.parametrize("threads", [1, 4])
def test_minilm_round_trip(client, threads: int) -> None:
    version, nbytes = load_checkpoint(client, WEIGHTS, f"ingest/minilm-{threads}", threads=threads)
    assert version == 1
    assert nbytes == os.path.getsize(WEIGHTS) - 8 - _header_len(WEIGHTS)
    _check_set(client, f"ingest/minilm-{threads}", load_file(WEIGHTS))
    assert client.info(f"ingest/minilm-{threads}")["origin"] == f"file:{WEIGHTS}"


def _header_len(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[:8], "little")


# -- generated checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 3])
def test_small_chunks_many_dtypes(client, many, threads: int) -> None:
    """Chunks of one fingerprint block: every tensor above it is split, most not evenly."""
    path, expected = many
    tensors = read_checkpoint(path)
    specs = {t.name: (t.dtype, t.shape) for t in tensors}
    seen: list[int] = []
    with client.reserve(f"ingest/many-{threads}", specs) as r:
        fps = ingest_into(r.slab, r.manifest, tensors, threads=threads, progress=seen.append, chunk_bytes=BLOCK_BYTES)
        assert fps == [fingerprint(expected[t.name]) for t in r.manifest.tensors]
        for spec, fp in zip(r.manifest.tensors, fps, strict=True):
            r.written(spec.name, fp)
        r.commit()
    assert sum(seen) == sum(t.nbytes for t in tensors)
    assert max(seen) <= BLOCK_BYTES
    assert len(seen) > len([t for t in tensors if t.nbytes])  # some tensors took several chunks
    _check_set(client, f"ingest/many-{threads}", expected)


def test_load_file_equal_and_default_chunks(client, tmp_path) -> None:
    """Tensors larger than the default chunk (8 MiB) and not multiples of it."""
    expected = {
        "big": _random(torch.bfloat16, (5 * MiB + 3,), 1),  # 10 MiB + 6 bytes
        "odd": _random(torch.float32, (4 * MiB + 1, 1), 2),
        "tiny": _random(torch.int8, (3,), 3),
    }
    path = tmp_path / "big.safetensors"
    save_file(expected, path)
    load_checkpoint(client, path, "ingest/big", threads=4)
    reference = load_file(path)
    got = client.get("ingest/big", verify=True)
    for key, t in reference.items():
        assert _same(got[key], t), key


def test_hf_directory_with_index(daemon, client, tmp_path) -> None:
    shards = [
        {f"model.layers.{i}.w": _random(torch.float16, (64 + i, 33), i) for i in range(3)},
        {"model.embed.weight": _random(torch.bfloat16, (300_000,), 7)},
        {"lm_head.weight": _random(torch.float32, (17, 5), 8), "scale": _random(torch.float64, (), 9)},
    ]
    weight_map: dict[str, str] = {}
    for i, tensors in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-00003.safetensors"
        save_file(tensors, tmp_path / file)
        weight_map.update(dict.fromkeys(tensors, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tensord("load", str(tmp_path), "--name", "ingest/hf", "--quiet", "--threads", "2", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ingest/hf v1: ")
    expected = {k: v for f in sorted(tmp_path.glob("*.safetensors")) for k, v in load_file(f).items()}
    _check_set(client, "ingest/hf", expected)


# -- sharding on load -------------------------------------------------------------------------------

HIDDEN, KV, INTER, VOCAB = 64, 32, 128, 96


def _llama(layers: int = 2) -> dict[str, torch.Tensor]:
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "model.embed_tokens.weight": ((VOCAB, HIDDEN), torch.bfloat16),
        "model.norm.weight": ((HIDDEN,), torch.float32),
        "lm_head.weight": ((VOCAB, HIDDEN), torch.bfloat16),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": ((HIDDEN, HIDDEN), torch.bfloat16),
            p + "self_attn.k_proj.weight": ((KV, HIDDEN), torch.bfloat16),
            p + "self_attn.v_proj.weight": ((KV, HIDDEN), torch.bfloat16),
            p + "self_attn.o_proj.weight": ((HIDDEN, HIDDEN), torch.bfloat16),
            p + "mlp.gate_proj.weight": ((INTER, HIDDEN), torch.bfloat16),
            p + "mlp.up_proj.weight": ((INTER, HIDDEN), torch.bfloat16),
            p + "mlp.down_proj.weight": ((HIDDEN, INTER), torch.bfloat16),
            p + "input_layernorm.weight": ((HIDDEN,), torch.float32),
            p + "post_attention_layernorm.weight": ((HIDDEN,), torch.float32),
        }
    return {k: _random(dtype, shape, i) for i, (k, (shape, dtype)) in enumerate(shapes.items())}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = _llama()
    path = tmp_path_factory.mktemp("llama") / "model.safetensors"
    save_file(tensors, path)
    return path, tensors


def _check_shards(client, name: str, tp: int, rules: ShardRules, expected: dict[str, torch.Tensor]) -> None:
    shards = [client.get(f"{name}/tp{rank}", device="cpu", verify=True) for rank in range(tp)]
    for key, t in expected.items():
        dim = rules.match(key)
        if dim is None:
            assert all(_same(s[key], t) for s in shards), key
        else:
            assert all(s[key].shape[dim] == t.shape[dim] // tp for s in shards), key
            assert _same(torch.cat([s[key] for s in shards], dim=dim), t), key


@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_load_concatenates_to_the_original(client, llama, tp: int) -> None:
    path, expected = llama
    rules = builtin_rules("llama")
    loaded = load_sharded(client, path, f"ingest/llama{tp}", tp=tp, rules=rules, threads=3)
    assert loaded == [(f"ingest/llama{tp}/tp{rank}", 1) for rank in range(tp)]
    _check_shards(client, f"ingest/llama{tp}", tp, rules, expected)
    assert client.status()["reservations"] == 0
    assert client.info(f"ingest/llama{tp}/tp1")["origin"] == f"file:{path}#rank=1&tp={tp}"


def test_sharded_ranges_across_small_chunks(client, tmp_path) -> None:
    """Row-parallel shards are many ranges: they straddle chunks, small gaps are read through."""
    expected = {
        "a.down_proj.weight": _random(torch.float32, (1024, 1024), 1),  # 2 KiB runs, 2 KiB gaps
        "b.o_proj.weight": _random(torch.float32, (8, 65536), 2),  # 128 KiB runs, 128 KiB gaps
        "c.q_proj.weight": _random(torch.bfloat16, (1026, 333), 3),
        "d.norm.weight": _random(torch.float32, (BLOCK_BYTES // 4 + 9,), 4),
    }
    path = tmp_path / "rows.safetensors"
    save_file(expected, path)
    rules, tp = builtin_rules("llama"), 2
    tensors = read_checkpoint(path)
    for rank in range(tp):
        plans = plan_shards(tensors, rank, tp, rules)
        with client.reserve(f"ingest/rows/tp{rank}", {p.name: (p.dtype, p.shape) for p in plans}) as r:
            fps = ingest_into(r.slab, r.manifest, plans, threads=2, chunk_bytes=BLOCK_BYTES)
            for spec, fp in zip(r.manifest.tensors, fps, strict=True):
                r.written(spec.name, fp)
            r.commit()
    _check_shards(client, "ingest/rows", tp, rules, expected)


def test_cli_load_tp_with_rules_file(daemon, client, llama, tmp_path) -> None:
    path, expected = llama
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('default = "replicate"\n[[rule]]\npattern = "proj"\nsplit = 0\n')
    out = tensord(
        "load",
        str(path),
        "--name",
        "ingest/cli-tp",
        "--tp",
        "2",
        "--rules",
        str(rules_file),
        "--quiet",
        socket=daemon.socket,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "ingest/cli-tp/tp0 v1"
    assert out.stdout.splitlines()[1].startswith("ingest/cli-tp/tp1 v1: ")
    rules = ShardRules.from_pairs([("proj", 0)])
    _check_shards(client, "ingest/cli-tp", 2, rules, expected)
    out = tensord("load", str(path), "--name", "ingest/cli-tp", "--rules", "llama", socket=daemon.socket)
    assert out.returncode == 1
    assert out.stderr.strip() == "tensord: error: --rules needs --tp"


def test_a_rule_that_backtracks_for_ever_does_not_stall_the_daemon(daemon, client, tmp_path) -> None:
    """A client's rule pattern is matched in a child process with a time limit: other clients
    are served meanwhile, and the load fails saying why, with nothing reserved."""
    path = tmp_path / "evil.safetensors"
    save_file({"a" * 64 + "!": torch.ones(4), "w": torch.ones(4, 2)}, path)
    rules = tmp_path / "evil.toml"
    rules.write_text('default = "replicate"\n[[rule]]\npattern = "(a+)+$"\nsplit = 0\n')
    args = ("load", str(path), "--name", "ingest/evil", "--tp", "2", "--rules", str(rules), "--quiet")
    result: list[subprocess.CompletedProcess[str]] = []
    loading = threading.Thread(target=lambda: result.append(tensord(*args, socket=daemon.socket)))
    loading.start()
    slowest = 0.0
    while loading.is_alive():
        t0 = time.monotonic()
        client.ls()
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.1)
    assert slowest < 2.0, slowest  # never the 10 s the match runs for
    assert result[0].returncode == 1 and "took over 10 s to match" in result[0].stderr, result[0].stderr
    assert [s["name"] for s in client.ls() if s["name"].startswith("ingest/evil")] == []
    assert client.status()["reservations"] == 0


def test_non_divisible_dim_fails_before_reserving(daemon, client, llama) -> None:
    path, _ = llama
    before = client.status()["devices"]["cpu"]["used"]
    with pytest.raises(InvalidArgument, match="not divisible by tp=3"):
        load_sharded(client, path, "ingest/bad-tp", tp=3, rules=builtin_rules("llama"))
    out = tensord("load", str(path), "--name", "ingest/bad-tp", "--tp", "3", socket=daemon.socket)
    assert out.returncode == 1
    assert "not divisible by tp=3" in out.stderr
    assert "Traceback" not in out.stderr
    status = client.status()
    assert client.ls("ingest/bad-tp") == []
    assert status["reservations"] == 0
    assert status["devices"]["cpu"]["used"] == before


def test_sharded_failure_after_a_rank_is_written_commits_none(client, llama, tmp_path, monkeypatch) -> None:
    """The file cut short once part of every rank is written (the ranks fill in one pass): no
    rank is committed, no reservation is left."""
    path, expected = llama
    copy = tmp_path / "cut.safetensors"
    copy.write_bytes(path.read_bytes())
    before = client.status()["devices"]["cpu"]["used"]
    calls: list[int] = []

    def advance(self: Progress, n: int) -> None:
        calls.append(n)
        if len(calls) == len(expected):  # some of the ranks' bytes are in their slabs
            os.truncate(copy, 4096)

    monkeypatch.setattr(Progress, "advance", advance)
    with pytest.raises(InvalidArgument, match="truncated"):
        load_sharded(client, copy, "ingest/cut", tp=2, rules=builtin_rules("llama"), threads=1)
    assert len(calls) == len(expected)
    assert client.ls("ingest/cut") == []
    status = client.status()
    assert status["reservations"] == 0
    assert status["devices"]["cpu"]["used"] == before


class _MemorySink:
    """A sink over plain memory: what the load pipeline asks of a sink, and in which order."""

    def __init__(self, shards: dict[str, dict[str, torch.Tensor]], fail_commit: str | None = None) -> None:
        self.shards, self.fail_commit = shards, fail_commit
        self.events: list[tuple[str, str]] = []
        self.slabs: list[HostAccess] = []
        self.reserved: dict[str, tuple[Manifest, HostAccess]] = {}

    @contextmanager
    def reserve(self, name: str, table: Table, *, device: str, origin: str):
        offsets, nbytes = table.layout()
        fd = os.memfd_create("tensord-test")
        os.ftruncate(fd, nbytes)
        manifest, slab = Manifest(name, 0, table, offsets, nbytes), HostAccess(fd, nbytes, writable=True)
        self.events.append(("reserve", origin))
        self.reserved[name] = (manifest, slab)
        sink = self

        class Reserved:
            def __init__(self) -> None:
                self.manifest, self.slab, self.version = manifest, slab, 0

            def commit(self, fingerprints) -> int:
                if name == sink.fail_commit:
                    raise InvalidArgument("commit refused")
                sink.events.append(("commit", name))
                assert fingerprints == [fingerprint(sink.shards[name][t.name]) for t in manifest.tensors]
                self.version = 7
                return 7

        r = Reserved()
        try:
            yield r
        finally:
            self.events.append(("release" if r.version else "abort", name))
            self.slabs.append(slab)


def test_the_load_pipeline_reserves_every_rank_then_commits_them_all(llama) -> None:
    """The pipeline both sides run, over a sink of plain memory: every rank is written before
    any is committed; a commit that fails aborts the ranks not yet committed."""
    path, expected = llama
    rules, tp = builtin_rules("llama"), 2
    shards = {
        f"m/tp{rank}": {k: _shard(t, rules.match(k), rank, tp) for k, t in expected.items()} for rank in range(tp)
    }
    sink = _MemorySink(shards)
    loaded = load(sink, path, "m", tp=tp, rules=rules, threads=2)
    assert loaded.sets == [("m/tp0", 7), ("m/tp1", 7)]
    assert loaded.nbytes == sum(t.nbytes for shard in shards.values() for t in shard.values())
    origin = f"file:{path}"
    assert sink.events == [
        ("reserve", f"{origin}#rank=0&tp=2"),
        ("reserve", f"{origin}#rank=1&tp=2"),
        ("commit", "m/tp0"),
        ("commit", "m/tp1"),
        ("release", "m/tp1"),
        ("release", "m/tp0"),
    ]
    for slab in sink.slabs:
        slab.close()

    sink = _MemorySink(shards, fail_commit="m/tp1")
    with pytest.raises(InvalidArgument, match="commit refused"):
        load(sink, path, "m", tp=tp, rules=rules, threads=2)
    assert sink.events[-2:] == [("abort", "m/tp1"), ("release", "m/tp0")]
    for slab in sink.slabs:
        slab.close()


def _shard(t: torch.Tensor, dim: int | None, rank: int, tp: int) -> torch.Tensor:
    return t if dim is None else t.chunk(tp, dim=dim)[rank].contiguous()


LOG = logging.getLogger("tensord.test")


class _FakeStore:
    """What ``StoreSink`` uses of the daemon's Store, recorded."""

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.aborted: list[int] = []
        self.metrics = SimpleNamespace(moved=lambda *args: None)

    async def reserve(self, name: str, device: str, table: Table, origin: str) -> SimpleNamespace:
        offsets, nbytes = table.layout()
        return SimpleNamespace(id=5, manifest=Manifest(name, 0, table, offsets, nbytes), slab=None)

    async def commit(self, rid: int, fingerprints: np.ndarray) -> SimpleNamespace:
        self.committed.append(rid)
        return SimpleNamespace(manifest=SimpleNamespace(version=3, data_bytes=0))

    def abort(self, rid: int) -> None:
        self.aborted.append(rid)


@pytest.mark.parametrize("cancel", [False, True])
def test_a_daemon_side_load_cancelled_mid_ingest_commits_nothing(many, monkeypatch, cancel: bool) -> None:
    """The pipeline runs in a worker thread; a load cancelled (the daemon closing) while it
    ingests aborts when the ingest ends, and commits nothing."""
    import asyncio
    import threading

    from tensord.ingest import pipeline, store_sink
    from tensord.rpc import Session

    path, _ = many
    store, session = _FakeStore(), Session(1)
    ingesting, finish = threading.Event(), threading.Event()

    def slow_ingest(slabs, manifests, sources, **kwargs) -> Ingested:
        ingesting.set()
        assert finish.wait(30)
        return Ingested([[0] * len(m) for m in manifests], 0)

    monkeypatch.setattr(pipeline, "ingest_ranks", slow_ingest)
    monkeypatch.setattr(store_sink, "own_view", lambda slab: SimpleNamespace(close=lambda: None))

    async def run() -> None:
        task = asyncio.create_task(
            store_sink.load_on_daemon(
                store,
                store.metrics,
                session,
                str(path),
                "d/x",
                device="cpu",
                root=str(path.parent),
                threads=2,
                logger=LOG,
            )
        )
        await asyncio.to_thread(ingesting.wait, 30)
        assert session.reservations == {5}
        if cancel:
            task.cancel()
        finish.set()
        if cancel:
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(300):  # the thread goes on until it aborts
                if store.aborted:
                    break
                await asyncio.sleep(0.01)
        else:
            loaded = await task
            assert loaded.sets == [("d/x", 3)]

    asyncio.run(run())
    assert store.committed == ([] if cancel else [5])
    assert store.aborted == [5]  # after a commit, the Store ignores it
    assert session.reservations == set()


# -- export ---------------------------------------------------------------------------------------------


@needs_minilm
def test_cli_export_round_trip(daemon, client, many, tmp_path) -> None:
    path, expected = many
    load_checkpoint(client, path, "ingest/export")
    load_checkpoint(client, WEIGHTS, "ingest/export")  # v2
    out_file = tmp_path / "out.safetensors"
    out = tensord("export", "ingest/export", str(out_file), "--version", "1", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ingest/export v1 -> {out_file}: ")
    got = load_file(out_file)
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert _same(got[key], t), key
    out = tensord("export", "ingest/export", str(out_file), socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    reference = load_file(WEIGHTS)
    got = load_file(out_file)
    assert set(got) == set(reference)
    assert all(_same(got[k], t) for k, t in reference.items())


def test_export_refuses_dtypes_safetensors_lacks(client, tmp_path) -> None:
    client.put("ingest/complex", {"z": torch.zeros(3, dtype=torch.complex128), "x": torch.ones(2)})
    target = tmp_path / "z.safetensors"
    with pytest.raises(InvalidArgument, match="complex128"):
        export_set(client, "ingest/complex", target)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


# -- failures -----------------------------------------------------------------------------------------------


def test_truncated_file_commits_nothing(daemon, client, many, tmp_path) -> None:
    path, _ = many
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-5000])
    before = client.status()["devices"]["cpu"]["used"]
    out = tensord("load", str(cut), "--name", "ingest/cut1", socket=daemon.socket)
    assert out.returncode == 1
    assert "truncated" in out.stderr
    assert "Traceback" not in out.stderr
    assert client.ls("ingest/cut1") == []
    assert client.status()["reservations"] == 0
    assert client.status()["devices"]["cpu"]["used"] == before


def test_file_cut_while_loading(client, many, tmp_path) -> None:
    """The file shrinks after the first chunk: a clear error, the reservation aborted."""
    path, _ = many
    copy = tmp_path / "shrinking.safetensors"
    copy.write_bytes(path.read_bytes())
    tensors = read_checkpoint(copy)
    before = client.status()["devices"]["cpu"]["used"]

    def cut(_: int) -> None:
        os.truncate(copy, 4096)

    specs = {t.name: (t.dtype, t.shape) for t in tensors}
    with (
        pytest.raises(InvalidArgument, match="file ended at byte"),
        client.reserve("ingest/shrinking", specs) as r,
    ):
        ingest_into(r.slab, r.manifest, tensors, threads=1, progress=cut, chunk_bytes=BLOCK_BYTES)
    assert client.ls("ingest/shrinking") == []
    assert client.status()["reservations"] == 0
    assert client.status()["devices"]["cpu"]["used"] == before


def test_bad_arguments_change_nothing(client, many) -> None:
    path, _ = many
    tensors = read_checkpoint(path)
    before = client.status()["devices"]["cpu"]["used"]
    with pytest.raises(InvalidArgument, match="threads"):
        load_checkpoint(client, path, "ingest/args", threads=0)
    with pytest.raises(InvalidArgument, match="tp must be"):
        load_sharded(client, path, "ingest/args", tp=0, rules=builtin_rules("llama"))
    with client.reserve("ingest/args", {t.name: (t.dtype, t.shape) for t in tensors[:2]}) as r:
        with pytest.raises(InvalidArgument, match="sources for the 2 tensors"):
            ingest_into(r.slab, r.manifest, tensors)
        with pytest.raises(InvalidArgument, match="does not match"):
            ingest_into(r.slab, r.manifest, tensors[1::-1])
    assert client.ls("ingest/args") == []
    assert client.status()["reservations"] == 0
    assert client.status()["devices"]["cpu"]["used"] == before


@pytest.mark.parametrize("kind", ["memfd", "tensor"])
def test_ingest_into_memory_the_daemon_owns(many, caplog, kind: str) -> None:
    """In the daemon: its own memfd or tensor wrapped as a slab, progress in its log."""
    path, expected = many
    tensors = read_checkpoint(path)
    table = Table.build([t.name for t in tensors], [t.dtype for t in tensors], [t.shape for t in tensors])
    offsets, nbytes = table.layout()
    manifest = Manifest("inproc", 0, table, offsets, nbytes)
    if kind == "memfd":
        fd = os.memfd_create("tensord-test")
        os.ftruncate(fd, nbytes)
        slab = HostAccess(fd, nbytes, writable=True)
    else:
        slab = GpuAccess(torch.zeros(nbytes, dtype=torch.uint8))  # any flat uint8 tensor
    logger = logging.getLogger("tensord.test-daemon")
    bar = Progress(sum(t.nbytes for t in tensors), False, logger=logger, label="inproc", log_every=0.0)
    try:
        with caplog.at_level(logging.INFO):
            fps = ingest_into(slab, manifest, tensors, threads=2, progress=bar.advance, chunk_bytes=BLOCK_BYTES)
        assert fps == [fingerprint(expected[t.name]) for t in manifest.tensors]
        for spec in manifest.tensors:
            dst = torch.empty(spec.shape, dtype=expected[spec.name].dtype)
            slab.read_into(np.array([dst.data_ptr()]), np.array([spec.offset]), np.array([spec.nbytes]), dst.device)
            assert _same(dst, expected[spec.name]), spec.name
    finally:
        slab.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("inproc: ") and "GB/s" in line for line in lines)
    assert any(line.startswith("ingested 19 tensors") for line in lines)


def test_progress_logs_the_same_figures(caplog) -> None:
    logger = logging.getLogger("tensord.test-progress")
    bar = Progress(1000, False, logger=logger, label="m/tp0", log_every=0.0)
    with caplog.at_level(logging.INFO, logger=logger.name):
        bar.advance(400)
        bar.advance(600)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[-1].startswith("m/tp0: 0.00/0.00 GB, ")
    assert "GB/s, ETA 0.0 s" in lines[-1]


def test_concurrent_ingests_give_torch_its_threads_back_once_all_end() -> None:
    from tensord.ingest.engine import _torch_single_threaded

    before = torch.get_num_threads()
    a, b = _torch_single_threaded(), _torch_single_threaded()
    a.__enter__()
    b.__enter__()
    assert torch.get_num_threads() == 1
    a.__exit__(None, None, None)  # the first to start ends first: the other still runs
    assert torch.get_num_threads() == 1
    b.__exit__(None, None, None)
    assert torch.get_num_threads() == before
