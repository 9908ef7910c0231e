"""Engine sets: one rank's post-processed tensors, held once by the daemon and mapped by every
engine of the same key as its parameters and buffers (``"mount": true``).

An engine set ``NAME/tp{rank}/processed`` holds the tensors an engine has *after* its
post-processing (each tied tensor once), plus one uint8 tensor `LAYOUT` (JSON: which are
buffers, the tied aliases, the model's loading flags), and records in its origin the
`Derivation` it came from, with the engine's key and the `platform` it was post-processed for.
`MountLoad` finds one that fits, moves a first engine's tensors into one (`handover`), and
binds views of it into a model. Nothing here imports an engine: `sdk.engines.vllm_mount` drives
it for vLLM.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import platform as host
import time
from collections.abc import Mapping
from typing import Any

import torch

import sdk
from sdk.engines import handover
from sdk.engines.common import EngineOptions, engine_set
from sdk.engines.derived import Derivation, EngineKey, find_rank_version
from tensord_contract.errors import InvalidArgument, NotFound

log = logging.getLogger("sdk.engines")

#: The engine set's one extra tensor: JSON (uint8) naming buffers, tied aliases, model flags.
LAYOUT = "@tensord/layout"
#: Buffers up to this size are bound as private copies: engines write their buffers (vLLM
#: refills attention scales after loading), which would copy a whole page of a mapped slab.
PRIVATE_BUFFER_BYTES = 64 << 10
_MOUNTED = "_tensord_mounted"  # model.__dict__ key: kept out of state_dict and named_modules


class Mounted:
    """What keeps an engine's views valid: the client connection holding the mount's pin."""

    def __init__(self, client: sdk.Client, mount: sdk.Mount, layout: Mapping[str, Any]) -> None:
        self.client, self.mount, self.layout = client, mount, layout
        self.name, self.version = mount.name, mount.version


def mounted(model: torch.nn.Module) -> Mounted | None:
    """The engine set `model`'s parameters are views of; None when they are its own."""
    return model.__dict__.get(_MOUNTED)


def platform_of(device: torch.device) -> str:
    """What post-processed tensors are valid for: the device kind (and, for a GPU, its index,
    name and compute capability, since a mount maps one device's memory)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} {torch.cuda.get_device_name(index)} sm_{major}{minor}"
    return f"{device.type} {host.machine()} {torch.backends.cpu.get_cpu_capability()}"


def anonymous_bytes() -> int:
    """This process's anonymous memory: what it allocated or copied on write, not the pages of
    files and memfds (a mounted slab) it maps."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def export(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model's tensors after post-processing (the objects it holds), each once (tied ones under
    their first name), and the layout that binds them back: buffer names, aliases, the model's
    loading flags."""
    tensors: dict[str, torch.Tensor] = {}
    buffers: list[str] = []
    meta: list[str] = []  # tensors without bytes (layers this rank does not run)
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    named: list[tuple[str, torch.Tensor, bool]]
    named = [(n, t, False) for n, t in model.named_parameters(remove_duplicate=False)]
    named += [(n, t, True) for n, t in model.named_buffers(remove_duplicate=False)]
    for name, tensor, is_buffer in named:
        if name in tensors or name in aliases:
            continue
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        if tensor.device.type == "meta":
            meta.append(name)
            continue
        first[id(tensor)] = name
        tensors[name] = tensor
        if is_buffer:
            buffers.append(name)
    return tensors, {"buffers": buffers, "aliases": aliases, "attrs": _model_flags(model), "meta": meta}


def _model_flags(model: torch.nn.Module) -> dict[str, bool]:
    try:  # flags vLLM's load_weights sets on some models (EAGLE's shared embeddings, ...)
        from vllm.model_executor.model_loader.weight_cache.utils import export_model_attrs
    except ImportError:
        return {}
    return dict(export_model_attrs(model))


def layout_tensor(layout: Mapping[str, Any], device: torch.device) -> torch.Tensor:
    raw = json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)


def read_layout(tensors: Mapping[str, torch.Tensor], what: str) -> dict[str, Any]:
    """The layout an engine set carries; InvalidArgument when it has none or a malformed one."""
    raw = tensors.get(LAYOUT)
    try:
        if raw is None or raw.dtype != torch.uint8 or raw.dim() != 1:
            raise ValueError("no layout tensor")
        layout = json.loads(bytes(raw.cpu().numpy()))
        if not isinstance(layout, dict):
            raise ValueError("the layout is not an object")
        aliases, attrs = layout["aliases"], layout["attrs"]
        layout.setdefault("meta", [])
        for key in ("buffers", "meta"):
            if not (isinstance(layout[key], list) and all(isinstance(b, str) for b in layout[key])):
                raise ValueError(f"{key} must be a list of names")
        if not (isinstance(aliases, dict) and all(isinstance(v, str) for v in aliases.values())):
            raise ValueError("aliases must map names to names")
        if not (isinstance(attrs, dict) and all(isinstance(v, bool) for v in attrs.values())):
            raise ValueError("attrs must map names to booleans")
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"tensord: {what} is not an engine set ({exc})") from None
    return layout


def bind(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], layout: Mapping[str, Any], what: str) -> None:
    """Make `tensors` (but the layout) the parameters and buffers of `model`, by name, with the
    layout's aliases and flags: views, but small buffers (`PRIVATE_BUFFER_BYTES`), which are
    copied. A name whose module `model` lacks is an InvalidArgument."""
    modules = dict(model.named_modules(remove_duplicate=False))
    buffers = set(layout["buffers"])
    bound: dict[str, torch.Tensor] = {}

    def place(name: str) -> tuple[torch.nn.Module, str]:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if module is None or not leaf or leaf in module._modules:
            raise InvalidArgument(f"tensord: {what} does not fit this engine: it has no module for {name!r}")
        return module, leaf

    for name, tensor in tensors.items():  # per tensor: dict stores only (90k tensors in a set)
        if name == LAYOUT:
            continue
        module, leaf = place(name)
        if name in buffers:
            if tensor.numel() * tensor.element_size() <= PRIVATE_BUFFER_BYTES:
                tensor = tensor.clone()
            module._parameters.pop(leaf, None)
            module._buffers[leaf] = bound[name] = tensor
        else:
            module._buffers.pop(leaf, None)
            module._parameters[leaf] = bound[name] = torch.nn.Parameter(tensor, requires_grad=False)
    for alias, canonical in layout["aliases"].items():
        if canonical not in bound:
            raise InvalidArgument(f"tensord: {what}: alias {alias!r} names a missing tensor {canonical!r}")
        module, leaf = place(alias)
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)
        tensor = bound[canonical]
        if isinstance(tensor, torch.nn.Parameter):
            module._parameters[leaf] = tensor
        else:
            module._buffers[leaf] = tensor
    for flag, value in layout["attrs"].items():
        setattr(model, flag, value)


def meta_left(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers on the meta device that its engine set (if any) did not leave so."""
    if not any(
        t is not None and t.is_meta for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values())
    ):
        return []  # the common case, without building 90k names
    held = mounted(model)
    expected = set(held.layout["meta"]) if held is not None else set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return [name for name, t in named if t.is_meta and name not in expected]


class MountLoad:
    """One rank's load in mount mode (`load`): find or make the engine set, bind views of it."""

    def __init__(
        self, options: EngineOptions, *, rank: int, key: EngineKey, device: torch.device, pp_size: int
    ) -> None:
        if pp_size != 1:
            raise InvalidArgument("tensord: mount mode needs one pipeline stage (engine sets are per TP rank)")
        self.options, self.rank, self.key, self.device = options, rank, key, device
        self.platform = platform_of(device)
        self.name = engine_set(options.name, rank)

    def find(self, client: sdk.Client) -> int | None:
        """The newest version of the engine set made from the version asked for, by an engine of
        this key and platform; None when there is none (one log line says why)."""
        try:
            wanted: int | None = int(client.info(self.options.name, self.options.version)["version"])
        except NotFound:  # no whole set: any engine set of this key (made from files), for "latest"
            wanted = self.options.version if isinstance(self.options.version, int) else None
        found = find_rank_version(
            client, self.name, name=self.options.name, version=wanted, key=self.key, platform=self.platform
        )
        return None if found is None else found[0]

    def hand_over(self, client: sdk.Client, model: torch.nn.Module, source: Derivation) -> int | None:
        """Move `model`'s post-processed tensors into the store as the engine set, releasing
        each once copied (`handover.move`). None (logged) when the store refused them with the
        model intact; an error once the model lost tensors is raised."""
        tensors, layout = export(model)
        tensors[LAYOUT] = layout_tensor(layout, next(iter(tensors.values())).device)
        origin = Derivation(source.source, source.version, self.key, self.platform).to_origin()
        start = time.perf_counter()
        try:
            version = handover.move(client, self.name, model, tensors, origin=origin)
        except handover.Stranded as exc:
            raise sdk.TransferError(
                f"tensord: the engine lost its tensors to a failed hand-over: {exc}; restart it"
            ) from exc
        except (sdk.TensordError, OSError) as exc:
            log.warning("tensord: could not hand the post-processed tensors over as %s: %s", self.name, exc)
            return None
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        log.info(
            "tensord: moved %d post-processed tensors of rank %d (%.3f GB) into the store as %s v%d in %.2f s",
            len(tensors),
            self.rank,
            nbytes / 1e9,
            self.name,
            version,
            time.perf_counter() - start,
        )
        return version

    def open(self, client: sdk.Client, version: int) -> sdk.Mount | None:
        """A mount of the engine set on this node, pulled here first when it lies elsewhere;
        None (logged) when it cannot be mapped here on this engine's device."""
        try:
            try:
                mount = client.mount(self.name, version)
            except InvalidArgument:  # no replica on this node
                client.replicate(self.name, version, device=str(self.device))
                mount = client.mount(self.name, version)
        except (sdk.TensordError, OSError) as exc:
            log.warning("tensord: cannot map %s v%d here: %s", self.name, version, exc)
            return None
        lies = next(iter(mount.tensors.values())).device  # one slab: one device
        if lies != _resolved(self.device):
            log.warning("tensord: %s v%d lies on %s, not on this engine's %s", self.name, version, lies, self.device)
            mount.close()
            return None
        return mount

    def attach(self, model: torch.nn.Module, client: sdk.Client, mount: sdk.Mount) -> None:
        what = f"{mount.name} v{mount.version}"
        if self.options.verify:
            mount.verify()
        layout = read_layout(mount.tensors, what)
        bind(model, mount.tensors, layout, what)
        model.__dict__[_MOUNTED] = Mounted(client, mount, layout)

    def log(self, mount: sdk.Mount, seconds: float, grew: int, *, first: bool) -> None:
        """One line: what was mapped, how fast, and what it cost this process's own memory."""
        nbytes = int(mount.manifest.nbytes)
        log.info(
            "tensord: %s %s v%d (%d tensors, %.3f GB) in %.2f s; this process's anonymous memory %s by "
            "%.1f MB (%.1f%% of the set)",
            "handed its post-processed tensors to the store as" if first else "mounted",
            mount.name,
            mount.version,
            len(mount.tensors),
            nbytes / 1e9,
            seconds,
            "grew" if grew >= 0 else "shrank",
            abs(grew) / 1e6,
            100.0 * abs(grew) / max(nbytes, 1),
        )


def _resolved(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def release_unused() -> None:
    """Give the memory of tensors no longer referenced back to the system."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed heap pages otherwise
        ctypes.CDLL("libc.so.6").malloc_trim(0)
