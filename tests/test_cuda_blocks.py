"""The daemon's policy for freed GPU blocks, checked with host tensors standing in for blocks
(the GPU side runs in tests/test_gpu.py)."""

from __future__ import annotations

import torch

from tensord.memory import CudaBlocks


def _blocks(monkeypatch, sizes: list[int]) -> tuple[CudaBlocks, list[int]]:
    blocks, released = CudaBlocks(), []
    monkeypatch.setattr(blocks, "_release", lambda device, dropped: released.append(dropped))
    for n in sizes:
        blocks.give("cuda:0", (torch.empty(n, dtype=torch.uint8), [f"ipc-{n}"]))
    return blocks, released


def test_idle_blocks_shrink_to_the_unused_budget_largest_first(monkeypatch) -> None:
    blocks, released = _blocks(monkeypatch, [100, 300, 200])
    blocks.shrink("cuda:0", 1000)
    assert blocks.idle_bytes("cuda:0") == 600 and released == []
    blocks.shrink("cuda:0", 350)
    assert blocks.idle_bytes("cuda:0") == 300 and released == [1]  # the 300-byte block went
    blocks.shrink("cuda:0", -5)  # over budget: nothing stays idle
    assert blocks.idle_bytes("cuda:0") == 0 and released == [1, 2]
    assert blocks.idle_bytes("cuda:1") == 0


def test_a_slab_takes_the_smallest_idle_block_that_fits_without_much_waste(monkeypatch) -> None:
    blocks, _ = _blocks(monkeypatch, [1000, 1200, 1100, 5000])
    tensor, ipc = blocks.take("cuda:0", 1050)  # 1100 and 1200 fit (up to 1312); 1000 is too small
    assert tensor.numel() == 1100 and ipc == ["ipc-1100"]
    assert blocks.idle_bytes("cuda:0") == 1000 + 1200 + 5000
    tensor, _ = blocks.take("cuda:0", 1000)
    assert tensor.numel() == 1000  # an exact fit
    blocks.trim("cuda:0")
    assert blocks.idle_bytes("cuda:0") == 0
