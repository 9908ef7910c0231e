"""A module's state_dict entries (the tensors themselves), walked fast where that is the same.

`load_into(module)`, `put(name, module)` and `publish(name, module)` need
`module.state_dict(keep_vars=True)`: every parameter and persistent buffer under its dotted
name, in the module's order. torch's walk builds metadata and calls hooks at every module (and
`state_dict()` without `keep_vars` detaches every tensor): over a DeepSeek-like model of 60k
modules and 90k tensors it costs ~295 ms (`keep_vars`) and ~480 ms (detached) on the 2-core VM
(`benchmarks/plans.py`), more than the copy. Where no module changes what it saves (no
state_dict hooks, no override of `state_dict`, `_save_to_state_dict` or `get_extra_state`),
the same entries in the same order are read straight from each module's `_parameters` and
`_buffers` (~145 ms there); otherwise torch's own walk is used.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tensord_contract.bulk import paused_gc
from tensord_contract.errors import InvalidArgument

_Module = torch.nn.Module
_OWN = ("state_dict", "_save_to_state_dict", "get_extra_state")


def entries(target: torch.nn.Module | Mapping[str, torch.Tensor], op: str) -> Mapping[str, torch.Tensor]:
    """What `op` reads or writes: a mapping as given, a module's `state_tensors`."""
    if isinstance(target, torch.nn.Module):
        return state_tensors(target)
    if not isinstance(target, Mapping):
        raise InvalidArgument(f"{op} needs an nn.Module or a mapping of str to torch.Tensor")
    return target


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict(keep_vars=True)`, as a plain dict."""
    with paused_gc():
        out: dict[str, torch.Tensor] = {}
        try:
            if _plain(module, "", out, {}):
                return out
        except KeyError:  # a module whose attributes torch's __init__ did not set: torch's walk says why
            pass
        return dict(module.state_dict(keep_vars=True))


def _plain(module: torch.nn.Module, prefix: str, out: dict[str, torch.Tensor], kinds: dict[type, bool]) -> bool:
    """Add `module`'s entries under `prefix` to `out`, in torch's order (its parameters, its
    persistent buffers, then each child's); False where a module saves otherwise. `kinds`:
    whether each class seen in this walk saves as `nn.Module` does."""
    cls = type(module)
    plain = kinds.get(cls)
    if plain is None:
        plain = kinds[cls] = cls is _Module or all(getattr(cls, f) is getattr(_Module, f) for f in _OWN)
    state = module.__dict__
    if not plain or state["_state_dict_hooks"] or state["_state_dict_pre_hooks"]:
        return False
    for key, p in state["_parameters"].items():
        if p is not None:
            out[prefix + key] = p
    buffers = state["_buffers"]
    if buffers:
        skip = state["_non_persistent_buffers_set"]
        for key, b in buffers.items():
            if b is not None and key not in skip:
                out[prefix + key] = b
    for key, child in state["_modules"].items():
        if child is not None and not _plain(child, prefix + key + ".", out, kinds):
            return False
    return True
