"""Moving a model's tensors into the store: each is released as soon as its bytes are in the
slab, so a model handing its weights over never holds much more than one copy of them.

A tensor is released by putting a meta tensor of its shape in its place in every module that
holds it (tied ones included); its memory returns once nothing else refers to it (a kernel that
kept a reference keeps it until the model is bound again). Used by engines that mount their
own post-processed tensors afterwards (`sdk.engines.vllm_mount`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

import sdk

#: Bytes copied between two releases (GPU copies are synchronised first).
BATCH_BYTES = 256 << 20


class Stranded(sdk.TransferError):
    """The move failed after some of the model's tensors were released: the model lacks them."""


def holders(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter or buffer, by the tensor's id."""
    found: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for leaf, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                found.setdefault(id(t), []).append((module, leaf))
    return found


def release(model_holders: Mapping[int, list[tuple[torch.nn.Module, str]]], tensor: torch.Tensor) -> None:
    """Put a meta tensor of `tensor`'s shape in its place wherever the model holds it."""
    for module, leaf in model_holders.get(id(tensor), ()):
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(empty, requires_grad=False)
        else:
            module._buffers[leaf] = empty


def move(
    client: sdk.Client,
    name: str,
    model: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    origin: str,
    batch_bytes: int = BATCH_BYTES,
) -> int:
    """Put `tensors` (the model's own, by name, plus any extra ones) as the next version of
    `name`, releasing each of the model's from it once copied. Returns the version.

    Raises what `reserve` and the first write raise while the model is intact; a failure after
    tensors were released is `Stranded` (the model holds meta tensors in their place)."""
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise sdk.InvalidArgument(f"the tensors to move lie on several devices: {sorted(map(str, devices))}")
    (device,) = devices
    specs = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()}
    found = holders(model)
    released = False
    try:
        with client.reserve(name, specs, device=str(device), origin=origin) as reservation:
            batch: dict[str, torch.Tensor] = {}
            size = 0
            for key, tensor in tensors.items():
                batch[key] = tensor
                size += tensor.numel() * tensor.element_size()
                if size >= batch_bytes:
                    released = _write(reservation, batch, found, device) or released
                    batch, size = {}, 0
            _write(reservation, batch, found, device)
            return reservation.commit()
    except (sdk.TensordError, OSError) as exc:
        if released:
            raise Stranded(f"moving tensors into {name} failed half-way: {exc}") from exc
        raise


def _write(
    reservation: sdk.Reservation,
    batch: dict[str, torch.Tensor],
    found: Mapping[int, list[tuple[torch.nn.Module, str]]],
    device: torch.device,
) -> bool:
    """Write a batch, then release its tensors from the model; whether anything was released."""
    if not batch:
        return False
    reservation.write_all({k: t.detach() for k, t in batch.items()})
    if device.type == "cuda":  # the copies must be done before the sources can be freed
        torch.cuda.synchronize(device)
    for tensor in batch.values():
        release(found, tensor)
    return True
