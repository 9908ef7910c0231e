"""The fingerprint kernels shipped as PTX (`tensord_dataplane.fingerprint_ptx`): the PTX
assembles for sm_80 and sm_90 (where a `ptxas` is found); run by a small PTX interpreter
(`tests/ptx_emulator.py`) on host memory over the very table `fingerprint.piece_table` builds,
both definitions equal the CPU reference bit for bit; on a GPU, the same, and the order PTX,
Triton, gathered copies."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tensord_dataplane import fingerprint_ptx
from tensord_dataplane.fingerprint import (
    BLOCK_PIECE,
    WORD_PIECE,
    fingerprint,
    fingerprints,
    finish_shares,
    in_place_fingerprints,
    piece_table,
    slab_fingerprints,
)
from tensord_dataplane.kernel import PTX as COPY_PTX
from tests import ptx_emulator

_NAMES = {3: "tensord_fp_words", 2: "tensord_fp_blocks"}


def _ptxas() -> str | None:
    for found in (os.environ.get("PTXAS"), shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if found and Path(found).is_file():
            return found
    return None


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("which", ["fingerprint", "copy"])
def test_the_ptx_assembles(arch: str, which: str, tmp_path: Path) -> None:
    ptxas = _ptxas()
    if ptxas is None:
        pytest.skip("no ptxas here (set PTXAS=/path/to/ptxas)")
    source = tmp_path / "k.ptx"
    source.write_text(fingerprint_ptx.PTX if which == "fingerprint" else COPY_PTX)
    done = subprocess.run(
        [ptxas, f"-arch={arch}", "-o", str(tmp_path / "k.cubin"), str(source)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _tensors(sizes: list[int], seed: int, skew: int = 0) -> list[torch.Tensor]:
    """Random bytes of `sizes`, each at an 8-byte aligned address (+ `skew`), its own buffer."""
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.integers(0, 256, n + 16, dtype=np.uint8))[8 + skew : 8 + skew + n] for n in sizes]


def _emulated(ts: list[torch.Tensor], version: int, piece: int | None = None) -> list[int]:
    """What the PTX kernel computes over the table of `ts` (`piece`: words, or blocks for 2)."""
    sizes = np.array([t.numel() for t in ts], dtype=np.int64)
    ptrs = np.array([t.data_ptr() for t in ts], dtype=np.int64)
    rows, used = piece_table(ptrs, sizes, version, piece)
    shares = torch.zeros(max(len(used), 1), dtype=torch.int64)
    words = (piece or WORD_PIECE) if version == 3 else (piece or BLOCK_PIECE) * 32
    ptx_emulator.launch(
        fingerprint_ptx.PTX,
        _NAMES[version],
        len(rows),
        fingerprint_ptx.THREADS,
        [rows.ctypes.data, shares.data_ptr(), words],
    )
    return finish_shares(shares.numpy()[: len(used)].view(np.uint64), used, sizes, version).tolist()


@pytest.mark.parametrize("version", [3, 2])
def test_the_ptx_matches_the_definition_under_an_emulator(version: int) -> None:
    """Odd sizes and tails, pieces of 2500 words (3) or 90 blocks (2; 2880 words): a piece ends
    inside a stride of the block's threads; several pieces per tensor; the loop of four words a
    turn and the loop of one both run."""
    piece = 2500 if version == 3 else 90
    words = piece if version == 3 else piece * 32
    sizes = [0, 1, 7, 8, 9, 15, 16, 255, 256, 257, 2047, 8191, 8192, 8193, 32 * 1024 + 3, words * 8 * 3 + 5, 11]
    ts = _tensors(sizes, seed=version)
    assert _emulated(ts, version, piece) == [fingerprint(t, version=version) for t in ts]


def test_many_small_tensors_under_the_emulator() -> None:
    rng = np.random.default_rng(7)
    sizes = rng.integers(0, 90, 120).tolist()
    ts = _tensors(sizes, seed=8)
    for version in (3, 2):
        assert _emulated(ts, version) == [fingerprint(t, version=version) for t in ts]


def test_a_whole_piece_under_the_emulator() -> None:
    """The table's own 1 MiB pieces: one full piece and the tail of a second."""
    ts = _tensors([WORD_PIECE * 8 + 9], seed=3)
    assert _emulated(ts, 3) == [fingerprint(ts[0])]


def test_an_unknown_kernel_name_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensord_contract.errors import InvalidArgument
    from tensord_dataplane.fingerprint import _in_place

    monkeypatch.setenv("TENSORD_FINGERPRINT_KERNEL", "cuda")
    with pytest.raises(InvalidArgument, match="TENSORD_FINGERPRINT_KERNEL"):
        _in_place(torch.device("cpu"), np.zeros(1, np.int64), np.zeros(1, np.int64), 3)


# -- on a GPU ------------------------------------------------------------------------------------
_ODD = [0, 1, 7, 8, 9, 255, 4097, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 5, 8 * (1 << 20) + 8, 13]


def _on_gpu(sizes: list[int], seed: int, skew: int = 0) -> list[torch.Tensor]:
    """Tensors of `sizes` bytes at aligned (+ `skew`) places of one GPU buffer."""
    g = torch.Generator().manual_seed(seed)
    at = np.cumsum([0] + [(n + 15) // 8 * 8 + 8 for n in sizes])
    buf = torch.randint(0, 256, (int(at[-1]) + 16,), generator=g, dtype=torch.uint8).cuda()
    return [buf[a + skew : a + skew + n] for a, n in zip(at.tolist(), sizes, strict=False)]


@pytest.mark.gpu
@pytest.mark.parametrize("version", [3, 2])
def test_the_ptx_kernel_matches_the_cpu_on_a_gpu(version: int) -> None:
    ts = _on_gpu(_ODD, seed=version)
    sizes = np.array([t.numel() for t in ts], dtype=np.int64)
    ptrs = np.array([t.data_ptr() for t in ts], dtype=np.int64)
    want = [fingerprint(t.cpu(), version=version) for t in ts]
    with torch.cuda.device(ts[0].device):
        got = in_place_fingerprints("ptx", ts[0].device, ptrs, sizes, version)  # raises if it cannot load
    assert got.tolist() == want
    assert fingerprint_ptx.loaded()


@pytest.mark.gpu
@pytest.mark.parametrize("version", [3, 2])
def test_many_small_tensors_by_ptx_on_a_gpu(version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fingerprints` over thousands of tensors (aligned ones in place, unaligned ones gathered)
    and `slab_fingerprints`, with only the PTX kernel allowed: equal to the CPU's."""
    from tensord_dataplane import fingerprint as fpmod

    monkeypatch.setenv("TENSORD_FINGERPRINT_KERNEL", "ptx")
    rng = np.random.default_rng(version)
    sizes = [*rng.integers(0, 700, 5000).tolist(), WORD_PIECE * 8 * 2 + 3]
    ts = _on_gpu(sizes, seed=11) + _on_gpu(sizes[:300], seed=12, skew=3)
    want = [fingerprint(t.cpu(), version=version) for t in ts]
    assert fingerprints(ts, version=version) == want
    assert not fpmod._no_ptx and fingerprint_ptx.loaded()
    aligned = [(n + 255) // 256 * 256 for n in sizes]
    offsets = np.cumsum([0, *aligned[:-1]]).astype(np.int64)
    slab = torch.zeros(int(sum(aligned)) + 256, dtype=torch.uint8, device="cuda")
    for o, t in zip(offsets.tolist(), ts, strict=False):
        slab[o : o + t.numel()] = t
    got = slab_fingerprints(slab, offsets, np.array(sizes, dtype=np.int64), version=version)
    assert got.tolist() == want[: len(sizes)]


@pytest.mark.gpu
@pytest.mark.parametrize("version", [3, 2])
def test_ptx_and_triton_agree_on_a_gpu(version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    ts = _on_gpu(_ODD * 3, seed=5)
    monkeypatch.setenv("TENSORD_FINGERPRINT_KERNEL", "ptx")
    by_ptx = fingerprints(ts, version=version)
    monkeypatch.setenv("TENSORD_FINGERPRINT_KERNEL", "triton")
    by_triton = fingerprints(ts, version=version)
    assert by_ptx == by_triton == [fingerprint(t.cpu(), version=version) for t in ts]


@pytest.mark.parametrize(
    ("version", "before", "after"),
    [
        (3, "shfl.sync.down.b32 %r6, %r4, 16,", "shfl.sync.down.b32 %r6, %r4, 15,"),
        (3, "shr.u64 %rd19, %rd17, 27;", "shr.u64 %rd19, %rd17, 28;"),
        (3, "add.s64 %rd18, %rd12, 1;", "add.s64 %rd18, %rd12, 2;"),
        (3, "setp.ne.u64 %p1, %rd7, 0;", "setp.ne.u64 %p1, %rd7, 1;"),
        (3, "shl.b32 %r13, %r13, 3;", "shl.b32 %r13, %r13, 2;"),
        (3, "min.u64 %rd10, %rd10, %rd6;", "mov.u64 %rd10, %rd10;"),
        (3, "bar.sync 0;", ""),
        (3, "ld.global.u64 %rd34, [%rd15];", "ld.global.u64 %rd34, [%rd15+8];"),
        (3, "mov.u64 %rd16, %rd35;", "mov.u64 %rd16, %rd34;"),
        (2, "shr.u64 %rd18, %rd12, 5;", "shr.u64 %rd18, %rd12, 4;"),
        (2, "shl.b64 %rd7, %rd7, 5;", ""),
    ],
)
def test_the_emulator_sees_a_wrong_bit(version: int, before: str, after: str) -> None:
    """The emulated check is not vacuous: one changed instruction of a kernel fails it."""
    name = _NAMES[version]
    head, _, rest = fingerprint_ptx.PTX.partition(f".entry {name}")
    assert before in rest
    ptx = head + f".entry {name}" + rest.replace(before, after, 1)
    piece = 2500 if version == 3 else 90
    ts = _tensors([1, 9, 4096 + 3, 2880 * 8 * 2 + 5], seed=4)
    sizes = np.array([t.numel() for t in ts], dtype=np.int64)
    ptrs = np.array([t.data_ptr() for t in ts], dtype=np.int64)
    rows, used = piece_table(ptrs, sizes, version, piece)
    shares = torch.zeros(len(used), dtype=torch.int64)
    words = piece if version == 3 else piece * 32
    try:
        ptx_emulator.launch(ptx, name, len(rows), fingerprint_ptx.THREADS, [rows.ctypes.data, shares.data_ptr(), words])
    except AssertionError:
        return  # caught by the emulator itself (a shared value read before the barrier, ...)
    got = finish_shares(shares.numpy().view(np.uint64), used, sizes, version).tolist()
    assert got != [fingerprint(t, version=version) for t in ts]
