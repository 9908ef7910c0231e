"""`Snapshot.holds`: a kept plan's check, with torch's tensor guard and without it (the columns
compared afresh). Every change that makes a plan wrong must be seen by both."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import pytest
import torch

from tensord_dataplane import snapshot as snapshot_module
from tensord_dataplane.snapshot import Snapshot


@pytest.fixture(params=["guard", "columns"])
def take(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Callable[[list], Snapshot]:
    if request.param == "columns":
        monkeypatch.setattr(snapshot_module, "_guard", lambda values: None)

    def taken(values: list) -> Snapshot:
        s = Snapshot.take(values)
        assert s is not None and (s.guard is None) == (request.param == "columns")
        return s

    return taken


def _tensors() -> list[torch.Tensor]:
    return [
        torch.arange(12, dtype=torch.float32).reshape(3, 4),
        torch.zeros(5, 5),
        torch.nn.Parameter(torch.ones(7, dtype=torch.bfloat16)),
        torch.zeros(4, dtype=torch.complex64),
        torch.zeros(0, 3),
    ]


CHANGES: dict[str, Callable[[list[torch.Tensor]], None]] = {
    "replaced at a new address": lambda ts: ts.__setitem__(0, ts[0].clone()),
    "set_ to new storage": lambda ts: ts[1].set_(torch.zeros(5, 5)),
    "resized in place": lambda ts: ts[0].resize_(2, 2),
    "transposed in place": lambda ts: ts[1].t_(),
    "strided in place": lambda ts: ts[1].as_strided_((5, 5), (1, 5)),
    "the same memory as another dtype": lambda ts: ts.__setitem__(0, ts[0].view(torch.int32)),
    "a parameter's data swapped": lambda ts: setattr(ts[2], "data", torch.ones(7, dtype=torch.bfloat16)),
    "a conjugate view": lambda ts: ts.__setitem__(3, ts[3].conj()),
    "one tensor fewer": lambda ts: ts.pop(),
    "not a tensor": lambda ts: ts.__setitem__(4, 3),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_is_seen(take: Callable[[list], Snapshot], change: str) -> None:
    ts = _tensors()
    kept = take(ts)
    assert kept.holds(ts) and kept.holds(list(ts))
    CHANGES[change](ts)
    assert not kept.holds(ts)


def test_a_snapshot_keeps_no_tensor_alive(take: Callable[[list], Snapshot]) -> None:
    ts = _tensors()
    kept = take(ts)
    refs = [weakref.ref(t) for t in ts]
    del ts
    gc.collect()
    assert all(r() is None for r in refs)
    assert not kept.holds([torch.zeros(1)] * 5)


def test_a_plan_made_in_inference_mode_holds_outside_it(take: Callable[[list], Snapshot]) -> None:
    ts = _tensors()
    with torch.inference_mode():
        kept = take(ts)
        assert kept.holds(ts)
    assert kept.holds(ts)
    with torch.no_grad():
        assert kept.holds(ts)
        ts[1].set_(torch.zeros(5, 5))
    assert not kept.holds(ts)
