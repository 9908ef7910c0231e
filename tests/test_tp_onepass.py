"""`tensord load --tp N` in one pass over the file: every rank's set holds exactly the slices of
the original tensors (row splits, column splits, middle dims, odd sizes, replicated tensors),
each byte of the file is read once, and a load that fails partway leaves no rank."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensord.checkpoint import read_checkpoint
from tensord.ingest import Progress, ingest_ranks, load
from tensord.ingest.reads import plan_groups
from tensord.sharding import ShardRules, builtin_rules, plan_shards
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest, Table
from tensord_dataplane.fingerprint import BLOCK_BYTES, fingerprint
from tensord_dataplane.host import HostAccess
from tensord_dataplane.tensors import as_bytes
from tests.daemons import child_env, tensord
from tests.data import random_tensor, same_bits
from tests.etcd_server import free_port
from tests.test_ingest import _llama, _MemorySink, _shard

#: name -> (dtype, shape); the rules below split them by rows, columns, a middle or the last dim,
#: with shards whose runs are not multiples of the fingerprint block (nor of 8 bytes).
SHAPES: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "a.embed.weight": (torch.float32, (65, 129)),  # replicated, several chunks
    "b.o_proj.weight": (torch.float32, (37, 24)),  # columns: runs of 48 (tp 2) or 24 (tp 4) bytes
    "c.down_proj.weight": (torch.bfloat16, (300, 1028)),  # columns: runs of 514 bytes at tp 4
    "d.big.down_proj.weight": (torch.float32, (64, 4096)),  # columns: 4 KiB runs at tp 4
    "e.q_proj.weight": (torch.bfloat16, (1028, 33)),  # rows: one run per rank
    "f.mid.weight": (torch.float16, (3, 8, 5)),  # dim 1 of 3
    "g.last": (torch.uint8, (7, 12)),  # the last dim: 3-byte runs at tp 4
    "h.norm.weight": (torch.float64, (3,)),
    "i.empty.o_proj.weight": (torch.float32, (0, 8)),
    "j.scale": (torch.int64, ()),
}
RULES = ShardRules.from_pairs([("o_proj|down_proj", 1), ("q_proj", 0), ("mid", 1), ("last", -1)])
RULES_TOML = (
    'default = "replicate"\n'
    '[[rule]]\npattern = "o_proj|down_proj"\nsplit = 1\n'
    '[[rule]]\npattern = "q_proj"\nsplit = 0\n'
    '[[rule]]\npattern = "mid"\nsplit = 1\n'
    '[[rule]]\npattern = "last"\nsplit = -1\n'
)


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {k: random_tensor(d, s, i) for i, (k, (d, s)) in enumerate(SHAPES.items())}
    path = tmp_path_factory.mktemp("odd") / "odd.safetensors"
    save_file(tensors, path)
    return path, tensors


def _data_bytes(path: Path) -> int:
    """The tensor data of a safetensors file: all of it but the header."""
    return os.path.getsize(path) - 8 - int.from_bytes(path.read_bytes()[:8], "little")


def _shards(tensors: dict[str, torch.Tensor], rules: ShardRules, tp: int) -> list[dict[str, torch.Tensor]]:
    """Each rank's expected tensors, sliced by torch."""
    return [{k: _shard(t, rules.match(k), rank, tp) for k, t in tensors.items()} for rank in range(tp)]


def _host_slab(table: Table, name: str) -> tuple[Manifest, HostAccess]:
    offsets, nbytes = table.layout()
    fd = os.memfd_create("tensord-test")
    os.ftruncate(fd, nbytes)
    return Manifest(name, 0, table, offsets, nbytes), HostAccess(fd, nbytes, writable=True)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("chunk_bytes", [BLOCK_BYTES, 3 * BLOCK_BYTES, 64 << 10, None])
def test_every_rank_holds_its_slices_byte_exact(odd, tp: int, chunk_bytes: int | None) -> None:
    """Chunks of one fingerprint block up to the default: groups straddle rows, partial rows
    read their neighbours' bytes into the scratch buffer; the default chunk reads whole rows,
    every byte of the file once."""
    path, tensors = odd
    files = read_checkpoint(path)
    plans = [plan_shards(files, rank, tp, RULES) for rank in range(tp)]
    slabs = [
        _host_slab(Table.build([p.name for p in ps], [p.dtype for p in ps], [p.shape for p in ps]), f"o/tp{r}")
        for r, ps in enumerate(plans)
    ]
    done: list[int] = []
    try:
        ordered = [
            [{p.name: p for p in ps}[t.name] for t in m.tensors] for ps, (m, _) in zip(plans, slabs, strict=True)
        ]
        got = ingest_ranks(
            [s for _, s in slabs],
            [m for m, _ in slabs],
            ordered,
            threads=3,
            chunk_bytes=chunk_bytes,
            progress=done.append,
        )
        want = _shards(tensors, RULES, tp)
        for rank, (manifest, slab) in enumerate(slabs):
            base = slab.base()
            for spec, fp in zip(manifest.tensors, got.fingerprints[rank], strict=True):
                t = want[rank][spec.name]
                assert torch.equal(base[spec.offset : spec.offset + spec.nbytes], as_bytes(t.contiguous())), (
                    rank,
                    spec.name,
                )
                assert fp == fingerprint(t), (rank, spec.name)
        assert sum(done) == sum(s.nbytes for ps in plans for s in ps)  # progress counts every rank's bytes
        data = _data_bytes(path)
        assert got.read >= data
        if chunk_bytes is None:  # whole rows: each byte read once, the replicated tensors too
            assert got.read == data
    finally:
        for _, slab in slabs:
            slab.close()


def test_the_groups_read_each_byte_of_a_llama_file_once(tmp_path) -> None:
    """The plan of a Llama file at tp 4: replicated tensors and column splits in groups of every
    rank, row splits alone; together they cover the file's data exactly once."""
    path = tmp_path / "llama.safetensors"
    save_file(_llama(), path)
    files, tp = read_checkpoint(path), 4
    ranks = [plan_shards(files, rank, tp, builtin_rules("llama")) for rank in range(tp)]
    fd = os.open(path, os.O_RDONLY)
    try:
        groups = plan_groups(ranks, {str(path): fd}, 1 << 20)
    finally:
        os.close(fd)
    covered = []
    for g in groups:
        names = {ranks[c.rank][c.index].name for c in g.chunks}
        assert len(names) == 1
        (name,) = names
        dim = builtin_rules("llama").match(name)
        if dim is None or "o_proj" in name or "down_proj" in name:
            assert sorted(c.rank for c in g.chunks) == list(range(tp)), name
            assert g.same == (dim is None), name
        else:
            assert len(g.chunks) == 1, name
        for c in g.chunks[:1] if g.same else g.chunks:
            r = c.runs
            covered += [
                (
                    r.first + row * r.stride + max(c.start - row * r.length, 0),
                    min((row + 1) * r.length, c.start + c.nbytes) - max(row * r.length, c.start),
                )
                for row in range(c.start // r.length, (c.start + c.nbytes - 1) // r.length + 1)
            ]
    covered.sort()
    assert sum(n for _, n in covered) == _data_bytes(path)
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(covered))  # no byte twice


def test_the_pipeline_reads_the_file_once_for_all_ranks(tmp_path) -> None:
    path = tmp_path / "llama.safetensors"
    tensors = _llama()
    save_file(tensors, path)
    rules, tp = builtin_rules("llama"), 4
    shards = {f"m/tp{r}": s for r, s in enumerate(_shards(tensors, rules, tp))}
    sink = _MemorySink(shards)  # checks every rank's fingerprints at its commit
    bars: list[Progress] = []
    loaded = load(sink, path, "m", tp=tp, rules=rules, threads=2, track=bars.append)
    try:
        assert loaded.sets == [(f"m/tp{r}", 7) for r in range(tp)]
        assert loaded.nbytes == sum(t.nbytes for s in shards.values() for t in s.values())
        assert loaded.read == _data_bytes(path)
        assert bars[0].done == bars[0].total == loaded.nbytes
        for name, (manifest, slab) in sink.reserved.items():
            base = slab.base()
            for spec in manifest.tensors:
                t = shards[name][spec.name]
                assert torch.equal(base[spec.offset : spec.offset + spec.nbytes], as_bytes(t.contiguous())), spec.name
    finally:
        for slab in sink.slabs:
            slab.close()


def test_a_file_cut_during_the_pass_commits_no_rank(tmp_path, monkeypatch) -> None:
    path = tmp_path / "cut.safetensors"
    tensors = _llama()
    save_file(tensors, path)
    rules, tp = builtin_rules("llama"), 2
    sink = _MemorySink({f"m/tp{r}": s for r, s in enumerate(_shards(tensors, rules, tp))})
    calls: list[int] = []
    half = os.path.getsize(path) // 2

    def advance(self: Progress, n: int) -> None:
        calls.append(n)
        if len(calls) == 1:  # bytes of every rank are in their slabs
            os.truncate(path, half)

    monkeypatch.setattr(Progress, "advance", advance)
    try:
        with pytest.raises(InvalidArgument, match=rf"file ended at byte {half} inside tensor .*truncated"):
            load(sink, path, "m", tp=tp, rules=rules, threads=1)
        assert calls
        assert not [e for e in sink.events if e[0] == "commit"]
        assert sorted(sink.events[tp:]) == [("abort", f"m/tp{r}") for r in range(tp)]
    finally:
        for slab in sink.slabs:
            slab.close()


@pytest.mark.parametrize("tp", [2, 4])
def test_cli_load_tp_passes_the_file_and_fills_every_rank(daemon, client, odd, tmp_path, tp: int) -> None:
    """As typed: the daemon reads the passed descriptor once for every rank."""
    path, tensors = odd
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES_TOML)
    out = tensord(
        "load",
        str(path),
        "--name",
        f"onepass/cli{tp}",
        "--tp",
        str(tp),
        "--rules",
        str(rules),
        "--quiet",
        socket=daemon.socket,
    )
    assert out.returncode == 0, out.stderr
    for rank, want in enumerate(_shards(tensors, RULES, tp)):
        got = client.get(f"onepass/cli{tp}/tp{rank}", verify=True)  # the fingerprints checked too
        assert sorted(got) == sorted(want)
        for k, t in want.items():
            assert same_bits(got[k], t), (rank, k)
    assert client.status()["reservations"] == 0


def test_cli_load_tp_of_a_truncated_file_leaves_no_rank(daemon, client, odd, tmp_path) -> None:
    path, _ = odd
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    out = tensord("load", str(cut), "--name", "onepass/cut", "--tp", "2", "--rules", "llama", socket=daemon.socket)
    assert out.returncode == 1 and "truncated" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert client.ls("onepass/cut") == [] and client.ls("onepass/cut/tp0") == []
    assert client.status()["reservations"] == 0


def test_over_tcp_every_rank_is_written_through_staging(start_daemon, odd, tmp_path) -> None:
    """Over TCP the command loads in its own process into remote slabs: each group is staged
    once and written to every rank's slab (the staged path GPU slabs take too)."""
    port = free_port()
    config = f'[daemon]\nlisten = "127.0.0.1:{port}"\ntoken = "t0ken"\n[transport]\nprotocol = "tcp"\n'
    d = start_daemon("tcp", config=config)
    path, tensors = odd
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES_TOML)
    env = child_env(TENSORD_ADDR=f"127.0.0.1:{port}", TENSORD_TOKEN="t0ken")
    env.pop("TENSORD_SOCKET", None)
    cmd = [
        sys.executable,
        "-m",
        "tensord",
        "load",
        str(path),
        "--name",
        "onepass/far",
        "--tp",
        "4",
        "--rules",
        str(rules),
    ]
    out = subprocess.run([*cmd, "--quiet"], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr
    with d.client() as c:
        for rank, want in enumerate(_shards(tensors, RULES, 4)):
            got = c.get(f"onepass/far/tp{rank}", verify=True)
            for k, t in want.items():
                assert same_bits(got[k], t), (rank, k)
