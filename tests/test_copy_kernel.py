"""The batched copy (`tensord_dataplane.copy.CopyTable`, the PTX kernel of `kernel.py`): rows as
the kernel reads them cover every byte exactly once, at any alignment; on a GPU the kernel
copies them bit-exactly; a fresh process's first reads compile nothing."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tensord_dataplane.copy import PIECE, CopyTable, copy_table, device_copy
from tests.daemons import DaemonProcess, child_env


def _scattered(device: str, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, np.ndarray, np.ndarray]:
    """Sources at odd and aligned places of a few buffers, sizes from 0 to past a piece, and
    where each lands in one destination buffer (also at odd places)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 3, 15, 16, 17, 31, 33, 255, 256, 4096 + 7, PIECE, PIECE + 13, 3 * PIECE + 16]
    src = torch.randint(0, 256, (sum(sizes) + 64 * len(sizes),), generator=g, dtype=torch.uint8).to(device)
    at, dst_at, s, d = [], [], 0, 0
    for i, n in enumerate(sizes):
        s += i % 5  # odd offsets for some
        d += (i * 3) % 7
        at.append(s)
        dst_at.append(d)
        s += n
        d += n
    dst = torch.zeros(d + 64, dtype=torch.uint8, device=device)
    return [src], dst, np.array([at, dst_at, sizes], dtype=np.int64), np.array(sizes)


def _emulate(t: CopyTable, dst_base: int, src_base: int) -> None:
    """What the two kernels do, row by row, on host memory."""
    wide, narrow = t._split()
    for d, s, units in wide.tolist():
        ctypes.memmove(dst_base + d, src_base + s, units * 16)
        assert (dst_base + d) % 16 == 0 and (src_base + s) % 16 == 0
    for d, s, n in narrow.tolist():
        ctypes.memmove(dst_base + d, src_base + s, n)


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_cover_every_byte_once(seed: int) -> None:
    (src,), dst, cols, _ = _scattered("cpu", seed)
    at, dst_at, sizes = cols
    base = 16 * 1024  # bases are added at run time: rows stay right for any 16-aligned pair
    table = CopyTable(dst_at + base, at + base, sizes)
    wide, narrow = table._split()
    assert (wide[:, 2] * 16 <= PIECE).all() and (narrow[:, 2] <= PIECE).all()
    assert int(wide[:, 2].sum()) * 16 + int(narrow[:, 2].sum()) == int(sizes.sum())
    _emulate(table, dst.data_ptr() - base, src.data_ptr() - base)
    want = torch.zeros_like(dst)
    for a, b, n in zip(at.tolist(), dst_at.tolist(), sizes.tolist(), strict=True):
        want[b : b + n] = src[a : a + n]
    assert torch.equal(dst, want)


def test_read_only_arrays_find_their_prepared_table_again() -> None:
    cols = [np.arange(0, 64, 16, dtype=np.int64), np.arange(0, 64, 16, dtype=np.int64), np.full(4, 8, np.int64)]
    for c in cols:
        c.flags.writeable = False
    assert copy_table(*cols) is copy_table(*cols)
    writable = [c.copy() for c in cols]
    assert copy_table(*writable) is not copy_table(*writable)  # may change between calls


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["kernel", "auto"])
def test_the_kernel_copies_bit_exactly(engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensord_dataplane import kernel

    monkeypatch.setenv("TENSORD_COPY_ENGINE", engine)
    (src,), dst, cols, _ = _scattered("cuda")
    at, dst_at, sizes = cols
    device_copy(dst_at, at, sizes, "cuda", dst_base=dst.data_ptr(), src_base=src.data_ptr())
    torch.cuda.synchronize()
    assert kernel.available(torch.cuda.current_device())
    want = torch.zeros_like(dst)
    for a, b, n in zip(at.tolist(), dst_at.tolist(), sizes.tolist(), strict=True):
        want[b : b + n] = src[a : a + n]
    assert torch.equal(dst, want)
    host = torch.zeros(dst.numel(), dtype=torch.uint8, pin_memory=True)  # mapped host memory as the target
    device_copy(dst_at, at, sizes, "cuda", dst_base=host.data_ptr(), src_base=src.data_ptr())
    torch.cuda.synchronize()
    assert torch.equal(host, want.cpu())


@pytest.mark.gpu
def test_a_fresh_process_first_reads_compile_nothing(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        src = {f"t{i}": torch.randn(100 + i, device="cuda") for i in range(300)}
        client.put("kernel/fresh", src)
    code = textwrap.dedent(
        """
        import sys, time, torch, sdk
        targets = {f"t{i}": torch.empty(100 + i, device="cuda") for i in range(300)}
        torch.cuda.synchronize()
        with sdk.Client() as c:
            t0 = time.perf_counter()
            c.load_into(targets, "kernel/fresh")
            got = c.get("kernel/fresh", names=[f"t{i}" for i in range(0, 300, 2)])
            took = time.perf_counter() - t0
        assert "triton" not in sys.modules, "triton was imported"
        print(took)
        """
    )
    _first_calls_fast(code, daemon)


@pytest.mark.gpu
def test_a_fresh_process_first_put_and_verified_reads_compile_nothing(daemon: DaemonProcess) -> None:
    """A put's fingerprints (of the slab, on the GPU) and verified reads run the PTX fingerprint
    kernel: no Triton imported, no compile on a fresh process's first calls."""
    code = textwrap.dedent(
        """
        import sys, time, torch, sdk
        from tensord_dataplane import fingerprint, fingerprint_ptx
        src = {f"t{i}": torch.randn(100 + i, device="cuda") for i in range(300)}
        targets = {f"t{i}": torch.empty(100 + i, device="cuda") for i in range(300)}
        torch.cuda.synchronize()
        with sdk.Client() as c:
            t0 = time.perf_counter()
            c.put("kernel/fresh-put", src)
            took = time.perf_counter() - t0
            c.load_into(targets, "kernel/fresh-put", verify=True)
            got = c.get("kernel/fresh-put", names=[f"t{i}" for i in range(0, 300, 2)], verify=True)
            whole = c.get("kernel/fresh-put", verify=True)
        assert all(torch.equal(targets[k], v) for k, v in src.items())
        assert all(torch.equal(got[f"t{i}"], src[f"t{i}"]) for i in range(0, 300, 2))
        assert torch.equal(whole["t7"], src["t7"])
        assert "triton" not in sys.modules, "triton was imported"
        assert fingerprint_ptx.loaded() and not fingerprint._no_ptx, fingerprint._no_ptx
        print(took)
        """
    )
    _first_calls_fast(code, daemon)


def _first_calls_fast(code: str, daemon: DaemonProcess) -> None:
    """Run `code` in a fresh process against `daemon`: it must pass and print seconds under 5."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(TENSORD_SOCKET=daemon.socket),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 5.0  # loose: no compile (seconds) on the way
