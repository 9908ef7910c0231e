"""Engine sets with no engine (`sdk.engines.engine_sets`, `sdk.engines.handover`), against a real
daemon: a model's post-processed tensors moved into the store, each released once copied, and
bound back as zero-copy views with ties, buffers and flags as they were; hostile or mismatched
sets are refused by name, and a store that refuses the move leaves the model intact."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import sdk
from sdk.engines import handover
from sdk.engines.engine_sets import LAYOUT, bind, export, layout_tensor, meta_left, read_layout
from tests.daemons import DaemonProcess


class Tiny(nn.Module):
    """An embedding tied to the output layer, a norm, a small buffer and a large one."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.embed = nn.Embedding(1000, 64, device=device)
        self.norm = nn.LayerNorm(64, device=device)
        self.head = nn.Linear(64, 1000, bias=False, device=device)
        self.head.weight = self.embed.weight  # tied
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(1000, 64, generator=g))
            self.norm.weight.copy_(torch.randn(64, generator=g))
        self.register_buffer("scale", torch.tensor(1.0, device=device))  # small: engines write these
        self.register_buffer("table", torch.randn(512, 256, generator=g).to(device), persistent=False)  # 512 KiB
        self.flag = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids)) * self.scale
        return self.head(x) + self.table[: ids.numel(), :1].sum()


def _meta() -> Tiny:
    with torch.device("meta"):
        return Tiny(device="meta")


def test_a_model_moves_into_the_store_and_binds_back_as_views(client: sdk.Client) -> None:
    _move_and_bind(client, "es/tiny", "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_model_moves_into_a_gpu_slab_and_binds_back_as_views(client: sdk.Client) -> None:
    x = torch.ones(8, 8, device="cuda:0")
    torch.nn.functional.linear(x, x)  # cuBLAS's workspace (32 MiB on Hopper) stays allocated: not the model's
    del x
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated("cuda:0")
    _move_and_bind(client, "es/tiny-gpu", "cuda:0", before=before)


def _move_and_bind(client: sdk.Client, name: str, device: str, before: int | None = None) -> None:
    """`before`: this process's allocated GPU bytes before the model existed."""
    model = Tiny(device=device)
    ids = torch.tensor([1, 5, 999, 0], device=device)
    with torch.no_grad():  # an autograd graph would hold the parameters
        expected = model(ids)
    tensors, layout = export(model)
    assert set(tensors) == {"embed.weight", "norm.weight", "norm.bias", "scale", "table"}  # the tie once
    assert layout["aliases"] == {"head.weight": "embed.weight"} and set(layout["buffers"]) == {"scale", "table"}
    layout["attrs"]["flag"] = True  # a loading flag, as vLLM's models record them
    tensors[LAYOUT] = layout_tensor(layout, torch.device(device))
    alive = weakref.ref(model.embed.weight)
    version = handover.move(client, name, model, tensors, origin="test", batch_bytes=64 << 10)
    del tensors
    gc.collect()
    assert alive() is None, "a moved tensor is released"
    if before is not None:  # the GPU memory of the moved tensors went back: the slab is the copy
        assert torch.cuda.memory_allocated(device) - before < (1 << 20)
    assert client.info(name, version)["device"] == device
    assert sorted(meta_left(model)) == ["embed.weight", "head.weight", "norm.bias", "norm.weight", "scale", "table"]

    # Bound back into a model built on the meta device, as a later engine does.
    with client.mount(name, version) as mount:
        fresh = _meta()
        fresh.flag = False
        bind(fresh, mount.tensors, read_layout(mount.tensors, name), name)
        assert not meta_left(fresh)
        assert fresh.head.weight is fresh.embed.weight  # the tie is one tensor again
        assert fresh.flag is True  # the model's flags as recorded
        with torch.no_grad():
            assert torch.equal(fresh(ids), expected)
        views = mount.tensors["table"].data_ptr(), mount.tensors["embed.weight"].data_ptr()
        assert (fresh.table.data_ptr(), fresh.embed.weight.data_ptr()) == views  # zero-copy
        assert fresh.scale.data_ptr() != mount.tensors["scale"].data_ptr()  # small buffers: private
        assert "table" in fresh._non_persistent_buffers_set  # persistence as the model declared it


def test_a_store_that_refuses_the_move_leaves_the_model_intact(tmp_path: Path) -> None:
    config = '[memory]\nbudgets = { cpu = "64KiB" }\nhuge_pages = false\n'
    daemon = DaemonProcess(tmp_path, "small", config=config).start()
    try:
        model = Tiny()
        with torch.no_grad():
            expected = model(torch.tensor([3]))
        tensors, _ = export(model)
        with daemon.client() as c, pytest.raises(sdk.OutOfCapacity):
            handover.move(c, "es/full", model, tensors, origin="test")
        with torch.no_grad():
            assert not meta_left(model) and torch.equal(model(torch.tensor([3])), expected)
    finally:
        daemon.kill()


def test_sets_without_a_good_layout_or_with_foreign_names_are_refused(client: sdk.Client) -> None:
    model = Tiny()
    tensors, layout = export(model)
    with pytest.raises(sdk.InvalidArgument, match="is not an engine set"):
        read_layout(dict(tensors), "plain")
    for bad in (b"{", b'{"buffers": "scale", "aliases": {}, "attrs": {}}', b'{"buffers": [], "aliases": {}}'):
        raw = {LAYOUT: torch.frombuffer(bytearray(bad), dtype=torch.uint8)}
        with pytest.raises(sdk.InvalidArgument, match="is not an engine set"):
            read_layout(raw, "bad")
    with pytest.raises(sdk.InvalidArgument, match=r"no module for .decoder\.weight."):
        bind(_meta(), {"decoder.weight": torch.zeros(2)}, layout, "foreign")
    with pytest.raises(sdk.InvalidArgument, match=r"alias .head\.weight. names a missing tensor"):
        bind(_meta(), {"norm.weight": torch.zeros(64)}, layout, "partial")


def test_a_daemon_killed_half_way_through_a_move_is_a_clear_error(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, "dies").start()
    model = Tiny()
    tensors, _ = export(model)

    class KillsOnSecondBatch(sdk.Client):
        def reserve(self, *args, **kw):  # type: ignore[no-untyped-def]
            reservation = super().reserve(*args, **kw)
            write_all, batches = reservation.write_all, []

            def write(batch):  # type: ignore[no-untyped-def]
                batches.append(batch)
                if len(batches) == 2:
                    daemon.kill()  # SIGKILL between two batches: the commit cannot land
                write_all(batch)

            reservation.write_all = write  # type: ignore[method-assign]
            return reservation

    with KillsOnSecondBatch(daemon.socket) as c, pytest.raises(handover.Stranded, match="failed half-way"):
        handover.move(c, "es/killed", model, tensors, origin="test", batch_bytes=1)
    assert "embed.weight" in meta_left(model)  # moved before the failure: the model says so


def test_tensors_without_bytes_are_recorded_not_moved() -> None:
    model = Tiny()
    model.norm.bias = nn.Parameter(torch.empty(64, device="meta"), requires_grad=False)  # a skipped layer's
    tensors, layout = export(model)
    assert "norm.bias" not in tensors and layout["meta"] == ["norm.bias"]


def test_post_processing_that_changes_nothing_is_told_from_any_rewrite() -> None:
    from sdk.engines import final

    def fresh() -> tuple[Tiny, final.Loaded]:
        model = Tiny()
        return model, final.snapshot(model)

    model, loaded = fresh()
    with torch.no_grad():
        model.scale.fill_(1.0)  # a small buffer written with the value it had (vLLM's scales)
    assert final.rewritten(model, loaded) == []
    changes = {
        "a write": lambda m: m.norm.weight.data.mul_(2),
        "a new tensor": lambda m: setattr(m.norm, "weight", nn.Parameter(m.norm.weight.detach().clone())),
        "a repack": lambda m: setattr(m.norm.weight, "data", torch.empty(0)),
        "a dtype change": lambda m: setattr(m.norm.weight, "data", m.norm.weight.data.half()),
        "a small buffer's new value": lambda m: m.scale.fill_(2.0),
    }
    for what, change in changes.items():
        model, loaded = fresh()
        with torch.no_grad():
            change(model)
        assert final.rewritten(model, loaded) in (["norm.weight"], ["scale"]), what
    model, loaded = fresh()
    del model.norm.bias  # dropped by post-processing
    model.norm.bias = None
    assert final.rewritten(model, loaded) == ["norm.bias"]
