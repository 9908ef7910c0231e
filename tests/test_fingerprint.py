"""The fingerprint definitions: the bulk paths (slab, parts, gathered, the Triton kernel run by
Triton's CPU interpreter) against a word-by-word reference, the corruptions definition 2 let
through, and manifests that carry the definition they were made with."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tensord_contract.errors import InvalidArgument, ProtocolError
from tensord_contract.manifest import FINGERPRINT_VERSION, Manifest, Table
from tensord_dataplane import fingerprint_words as fw
from tensord_dataplane.fingerprint import (
    fingerprint,
    fingerprint_finish,
    fingerprint_part,
    fingerprints,
    slab_fingerprints,
)
from tensord_dataplane.tensors import as_bytes

MASK = 2**64 - 1


def reference(data: bytes) -> int:
    """Definition 3, one word at a time."""
    share = 0
    for i in range(0, len(data), 8):
        word = int.from_bytes(data[i : i + 8].ljust(8, b"\0"), "little")
        share += fw.mix(word + (i // 8 + 1) * fw.G)
    return fw.mix((share & MASK) ^ ((len(data) * fw.K) & MASK))


def reference_v2(data: bytes) -> int:
    """Definition 2, one block at a time."""
    share = 0
    padded = data.ljust(-(-len(data) // 256) * 256, b"\0")
    for k in range(0, len(padded), 256):
        s = sum(int.from_bytes(padded[k + j : k + j + 8], "little") for j in range(0, 256, 8))
        share += s * (2 * (k // 256) + 0x9E3779B97F4A7C15)
    return (share & MASK) ^ ((len(data) * 0xFF51AFD7ED558CCD) & MASK)


def _bytes(t: torch.Tensor) -> bytes:
    return as_bytes(t.contiguous()).numpy().tobytes()


SIZES = [0, 1, 7, 8, 9, 255, 256, 257, 1000, 4099, 70_001, 600_003]


def _random(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))


@pytest.mark.parametrize("version", [2, 3])
def test_every_path_matches_the_reference(version: int) -> None:
    ref = reference if version == 3 else reference_v2
    tensors = [_random(n, i) for i, n in enumerate(SIZES)]
    tensors += [torch.tensor(2.5), torch.empty(0, 4), torch.randn(33, 7).bfloat16(), _random(1001, 99)[1:]]
    want = [ref(_bytes(t)) for t in tensors]
    assert [fingerprint(t, version=version) for t in tensors] == want
    assert fingerprints(tensors, version=version) == want  # gathered into a slab-like buffer
    sizes = np.array([as_bytes(t.contiguous()).numel() for t in tensors])
    aligned = (sizes + 255) // 256 * 256
    offsets = np.cumsum(aligned) - aligned
    buf = _random(int(aligned.sum()) + 256, 7)  # the padding between tensors is not zero
    for o, t in zip(offsets.tolist(), tensors, strict=True):
        buf[o : o + len(_bytes(t))] = as_bytes(t.contiguous())
    order = np.random.default_rng(3).permutation(len(tensors))  # rows in any order
    got = slab_fingerprints(buf, offsets[order], sizes[order], version=version)
    assert got.tolist() == [want[i] for i in order.tolist()]
    big = tensors[SIZES.index(600_003)]
    share = sum(fingerprint_part(big[s : s + 65536], s, len(big), version=version) for s in range(0, len(big), 65536))
    assert fingerprint_finish(share, len(big), version=version) == want[SIZES.index(600_003)]


def test_unknown_definitions_and_misaligned_parts_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="definition"):
        fingerprint(torch.ones(3), version=4)
    with pytest.raises(InvalidArgument, match="aligned"):
        fingerprint_part(_random(16, 0), 8, 64)


def _corruptions() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    rows = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    swapped = rows.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    flat = torch.randn(64, generator=torch.Generator().manual_seed(2))
    flipped = flat.clone()
    flipped[[1, 3]] = -flipped[[1, 3]]  # sign bits at odd indices: +2**63 twice in one block
    groups = torch.randn(64, generator=torch.Generator().manual_seed(3)).bfloat16()
    moved = groups.clone()
    moved[0:4], moved[4:8] = groups[4:8].clone(), groups[0:4].clone()
    return [("rows swapped", rows, swapped), ("sign flips", flat, flipped), ("bf16 groups", groups, moved)]


@pytest.mark.parametrize(("what", "before", "after"), _corruptions(), ids=lambda x: x if isinstance(x, str) else "")
def test_corruptions_the_block_sum_missed_are_caught(what: str, before: torch.Tensor, after: torch.Tensor) -> None:
    assert not torch.equal(as_bytes(before), as_bytes(after))
    assert fingerprint(before, version=2) == fingerprint(after, version=2), what  # why definition 3 exists
    assert fingerprint(before) != fingerprint(after), what


def test_random_changes_are_caught() -> None:
    rng = np.random.default_rng(11)
    base = _random(4096, 5)
    seen = {fingerprint(base)}
    for _ in range(200):
        t = base.clone()
        i, j = rng.integers(0, 512, 2) * 8
        if rng.random() < 0.5 and i != j:  # swap two words
            a = t[i : i + 8].clone()
            t[i : i + 8], t[j : j + 8] = t[j : j + 8].clone(), a
        else:  # compensating changes: +d in one word, -d in another
            w = t.view(torch.int64)
            d = int(rng.integers(1, 2**62))
            w[i // 8] += d
            w[(j // 8 + 1) % 512] -= d
        if torch.equal(t, base):
            continue
        fp = fingerprint(t)
        assert fp not in seen
        seen.add(fp)


def test_the_triton_kernel_matches_the_definition_under_the_interpreter() -> None:
    """Both kernels (definition 3 and 2), run by TRITON_INTERPRET=1 on CPU tensors, on sizes
    around their edges: several pieces, the last partial word."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import numpy as np, torch
        from tensord_dataplane.fingerprint import fingerprint, in_place_fingerprints
        from tensord_dataplane.fingerprint_kernels import kernels
        from tensord_dataplane.fingerprint_ptx import WORD_PIECE
        rng = np.random.default_rng(0)
        sizes = [0, 1, 7, 8, 9, 1000, 3, WORD_PIECE * 8 + 13, 2 * WORD_PIECE * 8, 5001]
        raw = [torch.from_numpy(rng.integers(0, 256, n + 8, dtype=np.uint8)) for n in sizes]
        ts = [r[8:] for r in raw]
        ptrs = np.array([t.data_ptr() for t in ts], dtype=np.int64)
        for version in (3, 2):
            got = in_place_fingerprints(kernels(), torch.device("cpu"), ptrs, np.array(sizes), version)
            assert got.tolist() == [fingerprint(t, version=version) for t in ts], version
        print("kernels agree")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "kernels agree" in done.stdout, done.stderr[-3000:]


def _manifest(fp_version: int) -> Manifest:
    table = Table.build(["x"], ["float32"], [[4]])
    offsets, nbytes = table.layout()
    fps = np.array([fingerprint(torch.zeros(4), version=fp_version)], dtype=np.uint64)
    return Manifest("old/set", 1, table, offsets, nbytes, fingerprints=fps, fp_version=fp_version)


def test_manifests_carry_their_definition() -> None:
    assert FINGERPRINT_VERSION == 3 and _manifest(3).wire["fp"] == 3
    old = Manifest.from_wire(_manifest(2).wire)  # as an older daemon wrote it
    assert old.fp_version == 2 and old.wire["fp"] == 2
    assert old.committed(2, old.fingerprints, 0.0, old.fp_version).fp_version == 2  # type: ignore[arg-type]
    for bad in (1, 4, "3", None, True):
        with pytest.raises(ProtocolError, match="definition"):
            Manifest.from_wire({**_manifest(3).wire, "fp": bad})


def test_the_torch_path_of_the_gpu_matches_the_numpy_path() -> None:
    """segment_shares over torch words (what a GPU slab runs; here on CPU tensors) gives the
    numpy path's shares bit for bit: runs within and across chunks, gaps, any order."""
    rng = np.random.default_rng(4)
    words = rng.integers(0, 2**63, 300_000, dtype=np.int64) * 2 + 1  # every bit pattern
    counts = rng.integers(0, 40_000, 12)
    starts = np.cumsum(counts + rng.integers(0, 50, 12)) - counts
    first = rng.integers(0, 1000, 12)
    order = rng.permutation(12)
    args = (starts[order], counts[order], first[order])
    want = fw.segment_shares(words.view(np.uint64), *args)
    assert np.array_equal(fw.segment_shares(torch.from_numpy(words), *args), want)
    x = words[:1000].view(np.uint64).copy()
    assert np.array_equal(fw.mix_torch(torch.from_numpy(words[:1000].copy())).numpy().view(np.uint64), fw.mix_np(x))
    assert [fw.mix(int(v)) for v in words[:5].view(np.uint64)] == fw.mix_np(words[:5].view(np.uint64).copy()).tolist()


def plain(data: bytes) -> int:
    """Definition 3 written plainly with whole-array numpy expressions (no chunks, no threads,
    no batching): the reference for sizes the word-by-word one is too slow for."""
    n = len(data)
    w = np.frombuffer(data + b"\0" * (-n % 8), dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = w + np.arange(1, len(w) + 1, dtype=np.uint64) * np.uint64(fw.G)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(fw.M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(fw.M2)
        x = x ^ (x >> np.uint64(31))
    return fw.mix((int(x.sum(dtype=np.uint64)) ^ (n * fw.K)) & MASK)


def _mixed_tensors() -> list[torch.Tensor]:
    """Every dtype and layout the fast paths meet: tails of 0..17 bytes, sizes around the chunk,
    span and in-place edges, non-contiguous and unaligned views, many small tensors, one large."""
    rng = np.random.default_rng(21)
    g = torch.Generator().manual_seed(21)
    out = [_random(n, n) for n in range(18)]  # 0..17 bytes: no word, partial words, tails
    for words in (1, 999, fw._SHORT - 1, fw._SHORT, fw._CPU_CHUNK + 1, (1 << 17) // 8 + 1):
        out += [_random(words * 8 + r, words + r) for r in (0, 3, 7)]
    out += [
        torch.tensor(2.5),
        torch.empty(0, 4),
        torch.randn(33, 7, generator=g).bfloat16(),
        torch.randn(7, 300, generator=g, dtype=torch.float64).t(),  # transposed
        torch.randn(5, 3, generator=g, dtype=torch.complex64),
        torch.randint(-(2**15), 2**15, (99,), generator=g, dtype=torch.int16),
        torch.rand(13, generator=g) > 0.5,
        _random(100_001, 8)[::3],  # strided
        _random(300_005, 9)[3:],  # not 8-byte aligned: gathered
    ]
    dtypes = [torch.uint8, torch.int16, torch.float32, torch.bfloat16, torch.float64]
    for i in range(3000):  # many small tensors
        dt = dtypes[i % len(dtypes)]
        t = torch.empty(int(rng.integers(0, 400)) // dt.itemsize, dtype=dt)
        as_bytes(t).copy_(torch.from_numpy(rng.integers(0, 256, t.numel() * dt.itemsize, dtype=np.uint8)))
        out.append(t)
    out.append(_random(3 * fw._PIECE * 8 + 5, 77))  # one large: several work items, a tail
    order = rng.permutation(len(out))
    return [out[i] for i in order.tolist()]


def test_fast_paths_match_a_plain_reference() -> None:
    """Every host path of definition 3 (one tensor, many in bulk on 1 and 4 threads, a slab,
    parts) equals the plain reference, bit for bit, which equals the word-by-word one."""
    for n in (*range(18), 255, 256, 1001):
        data = _random(n, 100 + n).numpy().tobytes()
        assert plain(data) == reference(data)
    tensors = _mixed_tensors()
    data = [_bytes(t) for t in tensors]
    want = [plain(d) for d in data]
    sizes = np.array([len(d) for d in data])
    aligned = (sizes + 255) // 256 * 256
    offsets = np.cumsum(aligned) - aligned
    buf = _random(int(aligned.sum()) + 256, 7)  # the padding between tensors is not zero
    for o, t in zip(offsets.tolist(), tensors, strict=True):
        b = as_bytes(t.contiguous())
        buf[o : o + b.numel()] = b
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            assert fingerprints(tensors) == want
            assert [fingerprint(t) for t in tensors] == want
            assert slab_fingerprints(buf, offsets, sizes).tolist() == want
    finally:
        torch.set_num_threads(threads)
    i = int(np.argmax(sizes))
    big, step = as_bytes(tensors[i]), 1 << 20
    share = sum(fingerprint_part(big[s : s + step], s, len(big)) for s in range(0, len(big), step))
    assert fingerprint_finish(share, len(big)) == want[i]
