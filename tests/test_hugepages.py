"""Host slabs in huge pages: same bytes, same guarantees, pages back to the kernel on delete.

These run where the kernel can give huge pages (`.ci/run` sets vm.nr_overcommit_hugepages);
elsewhere they skip.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensord.memory import HUGE_MIN_BYTES, HostSlab
from tests.daemons import tensord
from tests.data import random_tensor
from tests.data import same_bits as _same

MiB = 1 << 20


def _hugepages() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":") for line in f) if k.startswith("HugePages_")}


def _available() -> int:
    """Huge pages the kernel could give now (free ones plus what overcommit allows)."""
    try:
        with open("/proc/sys/vm/nr_overcommit_hugepages") as f:
            overcommit = int(f.read())
    except OSError:
        return 0
    info = _hugepages()
    return info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0) + overcommit - info.get("HugePages_Surp", 0)


pytestmark = pytest.mark.skipif(
    _available() < 256, reason="the kernel has no huge pages to give (sysctl vm.nr_overcommit_hugepages)"
)


def _big_set(seed: int = 0) -> dict[str, torch.Tensor]:
    return {
        "w": random_tensor(torch.bfloat16, (40 * MiB // 2,), seed),
        "b": random_tensor(torch.float32, (1000, 37), seed + 1),
        "e": torch.empty(0, 3),
        "s": random_tensor(torch.int64, (), seed + 2),
        "q": random_tensor(torch.uint8, (30 * MiB + 5,), seed + 3),
    }


def test_put_get_mount_in_huge_pages(start_daemon) -> None:
    d = start_daemon("huge")
    tensors = _big_set()
    with d.client() as c:
        before = _hugepages()["HugePages_Total"]
        v = c.put("big/set", tensors)
        assert c.status()["huge_pages"] >= 70 * MiB  # the slab really lies in huge pages
        got = c.get("big/set", v)
        assert all(_same(got[k], t) for k, t in tensors.items())
        with c.mount("big/set") as m:
            assert all(_same(m.tensors[k], t) for k, t in tensors.items())
            m.tensors["q"][:10] = 7  # copy-on-write: only this process sees it
            assert c.get("big/set", names=["q"])["q"][:10].tolist() == tensors["q"][:10].tolist()
        c.delete("big/set")
        assert c.status()["huge_pages"] == 0
    del m  # host-mount views outlive the mount and keep their pages until dropped
    gc.collect()
    assert _hugepages()["HugePages_Total"] <= before  # the pages went back to the kernel


def test_huge_pages_off_keeps_slabs_in_small_pages(start_daemon) -> None:
    d = start_daemon("small", env={"TENSORD_HUGE_PAGES": "false"})
    with d.client() as c:
        v = c.put("big/small", _big_set(5))
        assert c.status()["huge_pages"] == 0
        assert _same(c.get("big/small", v)["w"], _big_set(5)["w"])


def test_load_checkpoint_into_huge_pages(start_daemon, tmp_path: Path) -> None:
    """The CLI and the daemon both read a file straight into a huge-page slab."""
    tensors = _big_set(9)
    path = tmp_path / "model.safetensors"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
    d = start_daemon("load", env={"TENSORD_ALLOWED_ROOTS": str(tmp_path)})
    out = tensord("load", str(path), "--name", "big/cli", socket=d.socket)
    assert out.returncode == 0, out.stderr
    with d.client() as c:
        c.load_checkpoint(str(path), "big/daemon")
        assert c.status()["huge_pages"] >= 2 * 70 * MiB
        for name in ("big/cli", "big/daemon"):
            got = c.get(name, verify=True)
            assert all(_same(got[k], t) for k, t in tensors.items()), name


def test_no_huge_pages_left_falls_back_to_small_pages() -> None:
    """A slab larger than the kernel can give gets 4 KiB pages instead of failing."""
    nbytes = (_available() + 64) * 2 * MiB  # the fallback memfd is only sized, never filled
    slab = HostSlab(nbytes, "test", huge=True)
    try:
        assert not slab.huge and slab.size == nbytes
    finally:
        slab.free()
    small = HostSlab(HUGE_MIN_BYTES - 4096, "test", huge=True)
    try:
        assert not small.huge  # small slabs never take huge pages
    finally:
        small.free()
