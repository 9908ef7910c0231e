"""Check an engine's parameters against the version it claims to serve, after an RL update.

A parameter is checked when the version holds what it must equal: a tensor of the same name
(its fingerprint against the version's), the tensor of a parameter it is tied to (a tied
``lm_head.weight`` must equal ``embed_tokens.weight``), or the parts it fuses at tensor-parallel
size 1 (``qkv_proj`` = q, k and v concatenated). A parameter the previous version covered and
this one does not would keep its old value: that is a failure too. Engine-specific checks of
what the kernels compute with (re-packed copies) come from the engine (`vllm` module).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tensord_dataplane.fingerprint import fingerprints


@dataclass
class Checked:
    """What a check found: the parameters verified, and the problems (empty: all is well)."""

    verified: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def tie_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter name -> every name of the same parameter (tied), for names with more than one.
    Take it before an engine swaps parameters out for a reload."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    return {n: names for names in by_tensor.values() if len(names) > 1 for n in names}


def version_fingerprints(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """name -> fingerprint of a version's tensors: the manifest's when the read carries it (a
    mount's or a get's views), else computed over the tensors."""
    manifest = getattr(tensors, "manifest", None)
    fps = getattr(manifest, "fingerprints", None)
    if manifest is not None and fps is not None:
        return dict(zip(manifest.names, (int(x) for x in fps.tolist()), strict=True))
    names = list(tensors)
    return dict(zip(names, (int(x) for x in fingerprints([tensors[n] for n in names])), strict=True))


def check_parameters(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    ties: Mapping[str, list[str]],
    packed: Mapping[str, list[str]],
    tp_size: int = 1,
    covered: set[str] | None = None,
) -> Checked:
    """Compare `model`'s parameters with a version's `tensors` (see the module doc). `packed`:
    fused module name -> the checkpoint modules it fuses (vLLM's ``packed_modules_mapping``);
    `covered`: the parameters verified at the previous version, which must be verified now."""
    expected = version_fingerprints(tensors)
    out = Checked()
    by_name: list[tuple[str, str, torch.Tensor]] = []  # (parameter, version tensor, parameter)
    for name, p in model.named_parameters(remove_duplicate=False):
        target = next((n for n in [name, *ties.get(name, [])] if n in expected), None)
        if target is not None:
            t = tensors[target]
            if t.dtype == p.dtype and t.shape == p.shape:  # else converted: not comparable
                by_name.append((name, target, p.detach()))
            continue
        parts = _parts(name, packed, tensors)
        if parts is not None and tp_size == 1:
            fused = torch.cat([tensors[n] for n in parts])
            if fused.dtype == p.dtype and fused.shape == p.shape:
                if torch.equal(fused.to(p.device), p.detach()):
                    out.verified.add(name)
                else:
                    out.problems.append(f"{name} differs from the version's {' + '.join(parts)}")
    got = fingerprints([p for _, _, p in by_name])  # in bulk
    for (name, target, _), fp in zip(by_name, got, strict=True):
        if int(fp) == expected[target]:
            out.verified.add(name)
        else:
            out.problems.append(f"{name} differs from the version's {target}")
    for name in sorted((covered or set()) - out.verified):
        if not any(name in problem for problem in out.problems):
            out.problems.append(f"{name} is not in the version: the engine would keep its old value")
    return out


def _parts(name: str, packed: Mapping[str, list[str]], tensors: Mapping[str, torch.Tensor]) -> list[str] | None:
    module, _, leaf = name.rpartition(".")
    prefix, _, fused = module.rpartition(".")
    if fused not in packed:
        return None
    parts = [f"{prefix}.{part}.{leaf}" if prefix else f"{part}.{leaf}" for part in packed[fused]]
    return parts if all(n in tensors for n in parts) else None
