"""Whether an engine's post-processing left the parameters it loaded as they were ("final"), so
that they can be published where they lie, without a copy (``"publish": "in-place"``).

`snapshot` right after loading records, per state_dict entry, the tensor object, its address,
shape, dtype and device, and its fingerprint; `rewritten` after post-processing names every
entry that was replaced, moved, reshaped, re-typed, dropped or given other bytes. (Version
counters cannot tell: writes through ``.data``, which weight loaders use, do not bump them.) A
tensor written with the bytes it had (vLLM refills its attention scales with 1.0) is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdk.modules import state_tensors
from tensord_dataplane.fingerprint import fingerprints

Place = tuple[int, int, tuple[int, ...], torch.dtype, torch.device]


@dataclass(frozen=True)
class Loaded:
    """A model's state_dict right after loading: where each entry lies, and its fingerprint."""

    places: dict[str, Place]
    fingerprints: dict[str, int]


def _place(t: torch.Tensor) -> Place:
    return id(t), t.data_ptr(), tuple(t.shape), t.dtype, t.device


def _fingerprints(state: dict[str, torch.Tensor]) -> dict[str, int]:
    names = list(state)
    return dict(zip(names, (int(f) for f in fingerprints([state[n].detach() for n in names])), strict=True))


def snapshot(model: torch.nn.Module) -> Loaded:
    state = state_tensors(model)
    return Loaded({k: _place(t) for k, t in state.items()}, _fingerprints(state))


def rewritten(model: torch.nn.Module, loaded: Loaded) -> list[str]:
    """The state_dict entries that are not what `loaded` recorded (new or dropped ones too)."""
    state = state_tensors(model)
    changed = set(state) ^ set(loaded.places)
    kept = {k: t for k, t in state.items() if k in loaded.places and _place(t) == loaded.places[k]}
    changed |= set(state) - set(kept) - changed
    changed |= {k for k, fp in _fingerprints(kept).items() if fp != loaded.fingerprints[k]}
    return sorted(changed)
