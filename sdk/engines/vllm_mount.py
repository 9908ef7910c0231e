"""vLLM engines that mount their parameters (``"mount": true``): one copy of the weights per node.

Each rank's parameters and buffers are zero-copy views of an **engine set** (`engine_sets`)
``NAME/tp{rank}/processed``: that rank's tensors *after* vLLM's ``process_weights_after_loading``,
held once by the daemon and mapped by every engine of the same key (engine and version,
tensor-parallel size and rank, dtype, quantization) on the same platform.

- An engine that finds an engine set derived from the version it was asked for builds its model
  on the meta device, binds views of the set as its parameters and buffers (tied aliases and the
  model's loading flags as recorded), and runs vLLM's post-processing in its "weights already
  processed" mode, which rebuilds only Python-side kernel state (vLLM's protocol for its own
  weight cache). No weight byte is allocated or copied.
- The first engine of a key loads as usual (the whole set, a rank set or its files), lets vLLM
  post-process, moves the post-processed tensors into the store as the engine set (each of its
  own released once copied, so it never holds much more than one copy), then binds views of it
  like the others.

Kernels that keep a private repacked copy of a weight defeat this: on CPU, vLLM packs every
linear weight into oneDNN/SGL buffers and empties the parameter. In mount mode those layers
compute with ``torch.nn.functional.linear`` on the mapped weight instead (outputs agree with a
default engine to rounding, and across mount-mode engines to float32 rounding: torch's CPU
GEMM varies in the last bits with threads and alignment).

The mount stays open as long as the model lives: the daemon never evicts a mapped version. If
the daemon dies, host mappings (a memfd) and CUDA IPC mappings stay valid in the engine, which
keeps serving; new engines then load as the first one did. RL updates are refused: the
parameters are shared and read-only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import sdk
from sdk.engines.derived import Derivation, EngineKey
from sdk.engines.engine_sets import MountLoad, anonymous_bytes, meta_left, mounted, release_unused
from tensord_contract.errors import InvalidArgument, Unavailable


def load(
    loader: Any,
    vllm_config: Any,
    model_config: Any,
    prefix: str,
    *,
    rank: int,
    key: EngineKey,
    pp_size: int,
    load_private: Callable[[], torch.nn.Module],
) -> torch.nn.Module:
    """`TensordModelLoader.load_model` in mount mode: a model whose tensors are views of this
    rank's engine set. `load_private` is the ordinary load (it sets ``loader.derived_from``)."""
    device = torch.device(vllm_config.load_config.device or vllm_config.device_config.device)
    plan = MountLoad(loader.options, rank=rank, key=key, device=device, pp_size=pp_size)
    client = loader.options.client()
    try:
        model = _load(loader, plan, client, vllm_config, model_config, prefix, load_private)
    except BaseException:
        client.close()
        raise
    if mounted(model) is None:  # the engine holds its own tensors after all
        client.close()
    return model


def _load(
    loader: Any,
    plan: MountLoad,
    client: sdk.Client,
    vllm_config: Any,
    model_config: Any,
    prefix: str,
    load_private: Callable[[], torch.nn.Module],
) -> torch.nn.Module:
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    start, before = time.perf_counter(), anonymous_bytes()
    try:
        version = plan.find(client)
    except Unavailable:
        if loader.options.strict:
            raise
        version = None  # the ordinary load says so once more and falls back to the files
    mount = plan.open(client, version) if version is not None else None
    if mount is not None:
        with set_default_torch_dtype(model_config.dtype), torch.device("meta"):
            model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
        plan.attach(model, client, mount)
        reprocess(model, model_config, plan.device)
        left = meta_left(model)
        if left:
            raise InvalidArgument(
                f"tensord: {mount.name} v{mount.version} does not fit this engine: it lacks "
                f"{len(left)} of its tensors, e.g. {left[:3]}"
            )
        loader.source = ("tensord", mount.name, mount.version)
        plan.log(mount, time.perf_counter() - start, anonymous_bytes() - before, first=False)
        return model.eval()
    # The first engine of its key: load, post-process, move the result into the store, map it.
    with private_repacks_off():
        model = load_private()
    if loader.derived_from is None:
        return model
    start, before = time.perf_counter(), anonymous_bytes()
    version = plan.hand_over(client, model, loader.derived_from)
    if version is None:  # the store refused them: the engine keeps its own
        return model
    mount = plan.open(client, version)
    if mount is None:
        raise sdk.TransferError(
            f"tensord: the engine's tensors are in {plan.name} v{version} but cannot be mapped here"
        )
    plan.attach(model, client, mount)
    reprocess(model, model_config, plan.device)
    release_unused()
    plan.log(mount, time.perf_counter() - start, anonymous_bytes() - before, first=True)
    return model


@contextlib.contextmanager
def private_repacks_off() -> Iterator[None]:
    """vLLM's CPU post-processing without the private repacked copies of 2-D linear weights:
    those layers compute with ``torch.nn.functional.linear`` on the (mapped) weight."""
    from vllm.model_executor.layers import utils
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        yield
        return
    repack = utils.dispatch_cpu_unquantized_gemm

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.ndim != 2:  # conv/MoE packing rewrites the tensor itself: shareable
            repack(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear  # type: ignore[assignment]

    utils.dispatch_cpu_unquantized_gemm = dispatch  # imported by name inside the layers' methods
    try:
        yield
    finally:
        utils.dispatch_cpu_unquantized_gemm = repack


def derived_from(client: sdk.Client, kind: str, name: str, version: int) -> Derivation | None:
    """What a loaded set was made from, in terms of the whole set: itself, or for a rank set
    the whole set (or files) its derivation records."""
    if kind == "whole":
        return Derivation(name, version)
    recorded = Derivation.from_origin(client.info(name, version).get("origin"))
    return None if recorded is None else Derivation(recorded.source, recorded.version)


def reprocess(model: torch.nn.Module, model_config: Any, device: torch.device) -> None:
    """vLLM's post-processing of tensors that are post-processed already: rebuilds kernels'
    Python-side state only (vLLM's weight-cache protocol)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.model_executor.utils import weights_already_processed
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_default_torch_dtype(model_config.dtype), weights_already_processed(), private_repacks_off():
        process_weights_after_loading(model, model_config, device)


def refuse_if_mounted(model: torch.nn.Module, what: str) -> None:
    held = mounted(model)
    if held is not None:
        raise RuntimeError(
            f"tensord: this engine cannot {what}: its parameters are read-only views of {held.name} "
            f'v{held.version}, shared with other engines (mount mode); start it without "mount" to '
            "follow RL updates, or restart it on the new version"
        )
