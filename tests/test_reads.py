"""The file side of an ingest (`tensord.ingest.reads`): a chunk of a shard's runs, read with a
few preadv calls, holds exactly the bytes its (offset, length) ranges name."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from tensord.checkpoint import FileTensor
from tensord.ingest import reads
from tensord.sharding import Runs, ShardPlan
from tensord_contract.errors import InvalidArgument


def _expected(data: bytes, runs: Runs) -> bytes:
    return b"".join(data[o : o + n] for o, n in runs.ranges())


@pytest.mark.parametrize("seed", range(40))
def test_chunks_of_runs_hold_the_bytes_of_their_ranges(tmp_path: Path, seed: int, monkeypatch) -> None:
    rng = random.Random(seed)
    if seed % 4 == 0:
        monkeypatch.setattr(reads, "_IOV_MAX", rng.choice([3, 4, 7]))  # many calls per chunk
    if seed % 3 == 0:
        monkeypatch.setattr(reads, "_BATCH", rng.choice([1, 2, 5]))  # many batches of runs
    length = rng.choice([1, 3, 64, 1000, 4096])
    stride = length + rng.choice([0, 0, 1, 17, 4096, 70_000])  # 70 KB: past the scratch buffer
    count = rng.randint(1, 300)
    first = rng.randint(0, 5000)
    runs = Runs(first, count, stride, length)
    data = rng.randbytes(runs.end + rng.randint(0, 100))
    path = tmp_path / "f"
    path.write_bytes(data)
    want = _expected(data, runs)
    chunk = max(rng.choice([1, 7, length, 3 * length + 5, len(want)]), len(want) // 200)  # few chunks
    fd = os.open(path, os.O_RDONLY)
    try:
        src = _source(str(path), runs)
        got = bytearray()
        chunks = list(reads.plan_chunks([src], {str(path): fd}, chunk))
        assert [c.start for c in chunks] == list(range(0, len(want), chunk))
        for c in chunks:
            out = np.zeros(c.nbytes, dtype=np.uint8)
            reads.read_chunk(c, out.ctypes.data, np.empty(reads.GAP_BYTES, dtype=np.uint8), src)
            assert c.first == runs.first + c.start // length * stride + c.start % length
            got += out.tobytes()
    finally:
        os.close(fd)
    assert bytes(got) == want


def test_a_file_cut_short_names_the_tensor_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(100))
    fd = os.open(path, os.O_RDONLY)
    try:
        src = _source(str(path), Runs(40, 3, 30, 20))
        (c,) = reads.plan_chunks([src], {str(path): fd}, 1 << 20)
        out = np.zeros(c.nbytes, dtype=np.uint8)
        with pytest.raises(InvalidArgument, match=r"file ended at byte 100 inside tensor 'w'"):
            reads.read_chunk(c, out.ctypes.data, np.empty(reads.GAP_BYTES, dtype=np.uint8), src)
    finally:
        os.close(fd)


def _source(path: str, runs: Runs) -> ShardPlan:
    """A shard of tensor "w" of `path` whose bytes are `runs`."""
    size = runs.count * runs.length
    return ShardPlan(FileTensor("w", "uint8", (runs.end,), path, 0, runs.end), 0, 1, 0, (size,), runs)


@pytest.mark.parametrize("seed", range(30))
def test_a_group_reads_every_ranks_runs_in_one_pass(tmp_path: Path, seed: int, monkeypatch) -> None:
    """The ranks' runs side by side in each row (a column split, or one with a gap after the
    row): one group's vector fills every rank's memory with exactly its ranges, and reads no
    byte twice when the chunks hold whole rows."""
    rng = random.Random(seed)
    if seed % 3 == 0:
        monkeypatch.setattr(reads, "_IOV_MAX", rng.choice([2, 3, 4, 7]))
    if seed % 4 == 0:
        monkeypatch.setattr(reads, "_BATCH", rng.choice([1, 3, 8]))
    tp, length = rng.choice([2, 3, 4]), rng.choice([1, 3, 64, 514, 4096])
    count, first = rng.randint(2, 200), rng.randint(0, 3000)
    stride = tp * length + rng.choice([0, 0, 5, 70_000])
    ranks = [Runs(first + r * length, count, stride, length) for r in range(tp)]
    data = rng.randbytes(ranks[-1].end + rng.randint(0, 50))
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        sources = [[_source(str(path), runs)] for runs in ranks]
        chunk = rng.choice([256, 1024, 1 << 20])
        groups = reads.plan_groups(sources, {str(path): fd}, chunk)
        got = [bytearray() for _ in range(tp)]
        read = 0
        for g in groups:
            assert [c.rank for c in g.chunks] == list(range(tp)) and not g.same
            assert len({(c.start, c.nbytes) for c in g.chunks}) == 1
            outs = [np.zeros(c.nbytes, dtype=np.uint8) for c in g.chunks]
            junk = np.empty(reads.GAP_BYTES, dtype=np.uint8)
            read += reads.read_group(g, [o.ctypes.data for o in outs], junk, sources[0][0])
            for c, o in zip(g.chunks, outs, strict=True):
                got[c.rank] += o.tobytes()
    finally:
        os.close(fd)
    assert [bytes(b) for b in got] == [_expected(data, runs) for runs in ranks]
    if stride == tp * length and all(g.chunks[0].nbytes % length == 0 for g in groups[:-1]):
        assert read == tp * count * length  # whole rows: each byte once


def test_a_replicated_tensor_is_one_group_read_once(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = random.Random(1).randbytes(5000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        runs = Runs(100, 1, 4000, 4000)
        sources = [[_source(str(path), runs)] for _ in range(3)]
        groups = reads.plan_groups(sources, {str(path): fd}, 1024)
        assert all(g.same and g.staged == g.chunks[0].nbytes for g in groups)
        out = np.zeros(4000, dtype=np.uint8)
        read = 0
        for g in groups:
            c = g.chunks[0]
            read += reads.read_group(g, [out.ctypes.data + c.start] * 3, np.empty(16, dtype=np.uint8), sources[0][0])
    finally:
        os.close(fd)
    assert out.tobytes() == data[100:4100] and read == 4000
