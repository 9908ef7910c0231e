"""vLLM-specific parts of a verified RL update, and the checks made before an engine is built.

- `reprocess_tied`: vLLM's layer-wise reload re-processes the layers whose weights it loaded,
  but a layer whose weight is tied to another (a tied ``lm_head``) loads nothing and keeps what
  its ``process_weights_after_loading`` built from the old weight (on CPU: a GEMM handle packed
  from the old embedding). Running that processing again for tied layers makes them compute
  with the new weight.
- `kernel_problems`: what unquantized linear layers compute (through their kernels, packed
  copies included) against the plain product of their weight, on a small probe.
- `preflight`: options, the daemon and (strict) the set, checked when vLLM builds its config,
  before a minute of start-up.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch

import sdk
from sdk.engines.common import EngineOptions, engine_set, locate, rank_set
from sdk.engines.verify import tie_groups
from tensord_contract.errors import NotFound, Unavailable

log = logging.getLogger("sdk.engines")

#: Relative error allowed between a kernel and the plain product (bf16 accumulates loosely).
KERNEL_TOLERANCE = 2e-2
_UNQUANTIZED = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


def reprocess_tied(model: torch.nn.Module) -> list[str]:
    """Run ``quant_method.process_weights_after_loading`` again for the unquantized layers that
    own a tied parameter (after a reload, when the original parameters are back in place);
    their names. Quantized tied layers are left as they are (processing twice could convert
    twice): `kernel_problems` does not cover them either."""
    owners = {name.rpartition(".")[0] for name in tie_groups(model)}
    done = []
    for name, module in model.named_modules():
        method: Any = getattr(module, "quant_method", None)
        if name in owners and type(method).__name__ in _UNQUANTIZED:
            method.process_weights_after_loading(module)
            done.append(name)
    return done


def reprocess_tied_after_reloads() -> None:
    """Make vLLM's own in-place reload (``reload_weights()``, from files or through the tensord
    loader) re-process tied layers too: wraps its ``finalize_layerwise_reload``."""
    from vllm.model_executor.model_loader.reload import inplace

    finalize = inplace.finalize_layerwise_reload
    if getattr(finalize, "_tensord_ties", False):
        return

    @functools.wraps(finalize)
    def finalize_layerwise_reload(model: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        finalize(model, *args, **kwargs)
        reprocess_tied(model)

    finalize_layerwise_reload._tensord_ties = True  # type: ignore[attr-defined]
    inplace.finalize_layerwise_reload = finalize_layerwise_reload


@torch.no_grad()
def kernel_problems(
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    ties: Mapping[str, list[str]],
    packed: Mapping[str, list[str]],
    tp_size: int,
) -> list[str]:
    """Unquantized layers whose kernel (packed copies included: on CPU vLLM keeps only those)
    does not compute the product with the version's weight, on a small probe. The weight is
    the version's tensor of the layer (by name, tie or fused parts; tensor-parallel size 1),
    else the layer's own."""
    problems = []
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        method: Any = getattr(module, "quant_method", None)
        if type(method).__name__ not in _UNQUANTIZED:
            continue
        weight = _version_weight(name, tensors, ties, packed) if tp_size == 1 else None
        if weight is None:
            own = getattr(module, "weight", None)
            weight = own.detach() if isinstance(own, torch.Tensor) and own.numel() and not own.is_meta else None
        if weight is None or weight.ndim != 2 or not weight.is_floating_point():
            continue
        own_params = [p for p in module.parameters() if not p.is_meta and p.is_floating_point()]
        device, dtype = (own_params[0].device, own_params[0].dtype) if own_params else (weight.device, weight.dtype)
        probe = torch.randn(2, weight.shape[1], generator=g).to(device=device, dtype=dtype)
        got = method.apply(module, probe, None).float()
        if got.shape[-1] != weight.shape[0]:
            continue  # padded or sharded output: not comparable here
        want = torch.nn.functional.linear(probe.float(), weight.to(device).float())
        error = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)
        if error > KERNEL_TOLERANCE:
            problems.append(f"{name or 'model'} computes with other weights than the version's (error {error:.3g})")
    return problems


def _version_weight(
    module: str, tensors: Mapping[str, torch.Tensor], ties: Mapping[str, list[str]], packed: Mapping[str, list[str]]
) -> torch.Tensor | None:
    name = f"{module}.weight"
    for candidate in (name, *ties.get(name, [])):
        if candidate in tensors:
            return tensors[candidate]
    prefix, _, fused = module.rpartition(".")
    parts = [f"{prefix}.{p}.weight" if prefix else f"{p}.weight" for p in packed.get(fused, [])]
    if parts and all(p in tensors for p in parts):
        return torch.cat([tensors[p] for p in parts])
    return None


def _has_a_set(client: sdk.Client, options: EngineOptions, rank: int) -> bool:
    """Whether rank `rank` finds something to load: its rank set or the whole set, or in mount
    mode its engine set (whose fit the worker checks against its own key)."""
    if locate(client, options.name, options.version, rank=rank) is not None:
        return True
    if not options.mount:
        return False
    try:
        client.info(engine_set(options.name, rank))
    except NotFound:
        return False
    return True


def preflight(options_config: Any, *, tp_size: int) -> EngineOptions:
    """Check the loader's options, the daemon and (strict) that every rank has a set, before
    vLLM builds anything. Raises `sdk.InvalidArgument`, `sdk.Unavailable` or `sdk.NotFound`
    in strict mode; logs one warning otherwise (the workers load the model's files)."""
    options = EngineOptions.from_config(options_config)
    try:
        with options.client() as client:
            client.status()
            missing = [r for r in range(tp_size) if not _has_a_set(client, options, r)]
            if missing:
                wanted = f"neither {rank_set(options.name, missing[0])} nor {options.name}"
                raise NotFound(
                    f"tensord: {wanted} (version {options.version or 'latest'}) is in the store", name=options.name
                )
    except (NotFound, Unavailable) as exc:
        if options.strict:
            raise
        log.warning("tensord: %s; the engine will load its files (strict is off)", exc)
    return options
