"""A module's state_dict entries (the tensors themselves), walked fast where that is the same.

`load_into(module)` needs `module.state_dict(keep_vars=True)`: every parameter and persistent
buffer under its dotted name, in the module's order. torch's walk builds metadata and calls
hooks at every module; over a DeepSeek-like model of 60k modules and 90k tensors it costs
~260 ms (the 2-core VM), more than the copy. Where no module changes what it saves (no
state_dict hooks, no override of `state_dict`, `_save_to_state_dict` or `get_extra_state`),
the same entries in the same order are read straight from each module's `_parameters` and
`_buffers` (~150 ms there); otherwise torch's own walk is used.
"""

from __future__ import annotations

import torch

from tensord_contract.bulk import paused_gc

_Module = torch.nn.Module
_OWN = ("state_dict", "_save_to_state_dict", "get_extra_state")


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict(keep_vars=True)`, as a plain dict."""
    with paused_gc():
        out: dict[str, torch.Tensor] = {}
        if _plain(module, "", out):
            return out
        return dict(module.state_dict(keep_vars=True))


def _plain(module: torch.nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> bool:
    """Add `module`'s entries under `prefix` to `out`, in torch's order (its parameters, its
    persistent buffers, then each child's); False where a module saves otherwise."""
    cls = type(module)
    if cls is not _Module and any(getattr(cls, f) is not getattr(_Module, f) for f in _OWN):
        return False
    if module._state_dict_hooks or module._state_dict_pre_hooks:
        return False
    for key, p in module._parameters.items():
        if p is not None:
            out[prefix + key] = p
    skip = module._non_persistent_buffers_set
    for key, b in module._buffers.items():
        if b is not None and key not in skip:
            out[prefix + key] = b
    for key, child in module._modules.items():
        if child is not None and not _plain(child, prefix + key + ".", out):
            return False
    return True
