"""`sdk.modules.state_tensors`: a module's state_dict entries (keep_vars) read straight from its
modules where that gives the same, torch's own walk where a module saves otherwise."""

from __future__ import annotations

from typing import Any

import torch

from sdk.modules import state_tensors


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.norm = torch.nn.BatchNorm1d(4)  # buffers, num_batches_tracked among them
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.register_buffer("nothing", None)
        self.register_parameter("absent", None)


def _model() -> torch.nn.Module:
    m = torch.nn.Module()
    m.embed = torch.nn.Embedding(10, 4)
    m.layers = torch.nn.ModuleList([_Block() for _ in range(3)])
    m.heads = torch.nn.ModuleDict({"b": torch.nn.Linear(4, 2), "a": torch.nn.Linear(4, 2)})
    m.lm_head = torch.nn.Linear(4, 10, bias=False)
    m.lm_head.weight = m.embed.weight  # tied: both names, one tensor
    m.layers[1].extra = None  # a child slot left empty
    return m


def _same(model: torch.nn.Module) -> None:
    expected = model.state_dict(keep_vars=True)
    got = state_tensors(model)
    assert list(got) == list(expected)  # the same names, in the same order
    for k, v in expected.items():  # the tensors themselves (extra state: an equal value)
        assert got[k] is v if isinstance(v, torch.Tensor) else got[k] == v


def test_plain_modules_give_torchs_entries_in_torchs_order() -> None:
    model = _model()
    _same(model)
    assert "layers.0.scratch" not in state_tensors(model) and "layers.0.kept" in state_tensors(model)
    assert state_tensors(model)["lm_head.weight"] is model.embed.weight


def test_a_module_that_saves_otherwise_gets_torchs_walk() -> None:
    class Extra(torch.nn.Linear):
        def get_extra_state(self) -> Any:
            return {"scale": 2}

    class Renamed(torch.nn.Linear):
        def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
            destination[prefix + "w"] = self.weight

    hooked = _model()
    hooked.layers[2].proj._register_state_dict_hook(lambda mod, sd, prefix, meta: sd.pop(prefix + "bias"))
    _same(hooked)
    assert "layers.2.proj.bias" not in state_tensors(hooked)
    for layer in (Extra(4, 4), Renamed(4, 4)):
        model = _model()
        model.layers[0].proj = layer
        _same(model)
    assert "layers.0.proj.w" in state_tensors(model)
