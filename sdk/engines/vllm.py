"""vLLM integration: the ``tensord`` model loader and the ``tensord`` weight-transfer backend.

Installed with tensord, registered by the ``vllm.general_plugins`` entry point ``tensord``
(vLLM runs it in the API server, the engine core and every worker), so nothing is imported by
hand:

    vllm serve MODEL_DIR --load-format tensord --model-loader-extra-config '{"name": "llama-8b"}'
    LLM(model=MODEL_DIR, load_format="tensord", model_loader_extra_config={"name": "llama-8b"},
        weight_transfer_config={"backend": "tensord"})

MODEL_DIR needs the config and tokenizer files, not the weights. Options: `EngineOptions`.
RL: ``llm.update_weights({"update_info": {"name": "policy", "version": 7}})`` between
``start_weight_update()`` and ``finish_weight_update()``, or `follow(llm, "policy")`.
This module imports vLLM; ``import sdk`` never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

import sdk
from sdk.engines import final, vllm_mount
from sdk.engines.common import Capture, EngineOptions, load_set, publish_params
from sdk.engines.derived import FILES, Derivation, EngineKey
from sdk.engines.updates import WeightUpdater, mark_serving
from sdk.engines.vllm_checks import kernel_problems, preflight, reprocess_tied, reprocess_tied_after_reloads
from tensord_contract.errors import NotFound, Unavailable

log = logging.getLogger("sdk.engines")

LOAD_FORMAT = BACKEND = "tensord"


def _ranks() -> tuple[int, int, int]:
    """(tensor-parallel rank, pipeline-parallel rank, pipeline-parallel size) of this worker."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    pp = get_pp_group()
    return get_tensor_model_parallel_rank(), pp.rank_in_group, pp.world_size


def engine_key(model_config: ModelConfig, *, tp_rank: int) -> EngineKey:
    """The key a rank set in this engine's layout is valid for."""
    import vllm
    from vllm.distributed import get_tensor_model_parallel_world_size

    dtype = str(model_config.dtype).removeprefix("torch.")
    return EngineKey(f"vllm {vllm.__version__}", get_tensor_model_parallel_world_size(), tp_rank, dtype,
                     model_config.quantization)  # fmt: skip


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


class TensordModelLoader(BaseModelLoader):
    """``--load-format tensord``: each worker loads its rank set ``NAME/tp{rank}`` (engine
    layout, one copy into the parameters) when one was derived from the version asked for by
    an engine of its key (`sdk.engines.derived`), or else the whole set ``NAME`` through the model's
    ``load_weights``; from this node's daemon or, through it, any node of the cluster. A missing
    set (or an unreachable daemon) falls back to the model's files with one warning, or fails
    with ``"strict": true``. After a load from files the engine publishes what it read
    (``"publish"``), before vLLM repacks the parameters for its kernels. With ``"mount": true``
    the parameters are views of the post-processed engine set (`sdk.engines.vllm_mount`)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = EngineOptions.from_config(load_config.model_loader_extra_config)
        # The loader of the model's own files, for the fallback and for vLLM's completeness check.
        self._files_config = dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        #: Where the weights came from: ("tensord", set name, version) or ("files", model dir, 0).
        self.source: tuple[str, str, int] | None = None
        self._rank_sets = True
        self._key: EngineKey | None = None
        #: What the parameters were made from, in terms of the whole set (or the files).
        self.derived_from: Derivation | None = None
        self._in_place: tuple[final.Loaded, int, Derivation] | None = None  # "in-place": publish after processing

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: the weights come from tensord (the fallback downloads itself)."""

    def load_weights(self, model: torch.nn.Module, model_config: ModelConfig) -> None:
        tp_rank, pp_rank, pp_size = _ranks()
        # Rank sets are named by the tensor-parallel rank alone: with pipeline stages two workers
        # would share a name, so only whole sets are used (and "params" is not published) then.
        self._rank_sets = pp_size == 1
        kinds = ("rank", "whole") if self._rank_sets else ("whole",)
        files = DefaultModelLoader(self._files_config)
        self._key = engine_key(model_config, tp_rank=tp_rank)
        with self.options.client() as client:
            returned: list[Any] = []

            def through_model(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
                returned.append(model.load_weights(weights))  # type: ignore[operator]

            try:
                found = load_set(model, self.options, rank=tp_rank, device=_device(model),
                                 load_weights=through_model, client=client, kinds=kinds, key=self._key)  # fmt: skip
            except (NotFound, Unavailable) as exc:
                if self.options.strict:
                    raise
                log.warning("%s; loading %s from its files (strict is off)", exc, model_config.model)
            else:
                self.source = ("tensord", found.name, found.version)
                self.derived_from = vllm_mount.derived_from(client, found.kind, found.name, found.version)
                if found.kind == "whole":
                    mark_serving(model, found.name, found.version)
                    if model_config.quantization is None and returned[0] is not None:
                        files.track_weights_loading(model, returned[0])
                    # the next engine skips the conversion
                    self._publish_params(model, client, tp_rank, Derivation(found.name, found.version, self._key))
                return
            self._load_files(files, model, model_config, client, tp_rank=tp_rank, pp_rank=pp_rank)

    def load_model(self, vllm_config: Any, model_config: ModelConfig, prefix: str = "") -> torch.nn.Module:
        if not self.options.mount:
            model = super().load_model(vllm_config, model_config, prefix)
            if self._in_place is not None:
                self._publish_in_place(model, *self._in_place)
                self._in_place = None
            return model
        tp_rank, _, pp_size = _ranks()
        key = engine_key(model_config, tp_rank=tp_rank)
        return vllm_mount.load(
            self, vllm_config, model_config, prefix, rank=tp_rank, key=key, pp_size=pp_size,
            load_private=lambda: super(TensordModelLoader, self).load_model(vllm_config, model_config, prefix),
        )  # fmt: skip

    def get_all_weights(self, model_config: ModelConfig, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """For vLLM's in-place ``reload_weights()``: the whole set ``NAME`` (``version`` or the
        latest) as a private copy on the model's device, since vLLM's layer-wise reload keeps
        the tensors after this generator ends."""
        vllm_mount.refuse_if_mounted(model, "reload its weights")
        with self.options.client() as client:
            tensors = client.get(self.options.name, self.options.version, device=_device(model))
        log.info("tensord: reloading from %s (%d tensors)", self.options.name, len(tensors))
        yield from tensors.items()

    def _load_files(
        self,
        files: DefaultModelLoader,
        model: torch.nn.Module,
        model_config: ModelConfig,
        client: sdk.Client,
        *,
        tp_rank: int,
        pp_rank: int,
    ) -> None:
        mode = self.options.publish_mode
        capture = Capture() if mode == "checkpoint" and tp_rank == 0 and pp_rank == 0 else None
        if capture is not None:  # every tensor read from the files passes through the capture
            read_files = files.get_all_weights
            files.get_all_weights = lambda mc, m: capture.wrap(read_files(mc, m))
        files.load_weights(model, model_config)
        self.source = ("files", str(model_config.model), 0)
        self.derived_from = Derivation(FILES + str(model_config.model), 0)
        # vLLM calls process_weights_after_loading after this returns: the parameters are
        # still in the checkpoint's layout here.
        if capture is not None:
            capture.publish(client, self.options.name)
        else:
            self._publish_params(model, client, tp_rank, Derivation(FILES + str(model_config.model), 0, self._key))

    def _publish_params(self, model: torch.nn.Module, client: sdk.Client, tp_rank: int, source: Derivation) -> None:
        if self.options.publish_mode not in ("params", "in-place"):
            return
        if not self._rank_sets:
            log.warning("tensord: not publishing parameters: rank sets do not support pipeline parallelism")
            return
        if self.options.publish_mode == "in-place":  # after post-processing, if it changes nothing
            self._in_place = (final.snapshot(model), tp_rank, source)
            return
        publish_params(model, self.options.name, rank=tp_rank, client=client, derived_from=source)

    def _publish_in_place(self, model: torch.nn.Module, loaded: final.Loaded, tp_rank: int, source: Derivation) -> None:
        """Publish the parameters where they lie (no copy) if post-processing left them as loaded;
        the publication lives with the engine (its own client) until an RL update withdraws it."""
        changed = final.rewritten(model, loaded)
        if changed:
            log.warning(
                "tensord: not publishing rank %d's parameters in place: vLLM's post-processing rewrote %d of "
                'them (e.g. %s); "mount": true keeps one copy for every engine instead',
                tp_rank,
                len(changed),
                ", ".join(changed[:3]),
            )
            return
        client = self.options.client()
        try:
            publish_params(model, self.options.name, rank=tp_rank, client=client, derived_from=source, zero_copy=True)
        except sdk.TensordError as exc:
            client.close()
            log.warning("tensord: could not publish rank %d's parameters in place: %s", tp_rank, exc)
            return
        model.__dict__["_tensord_publisher"] = client  # the publication lives with its connection


# -- RL: the weight-transfer backend ---------------------------------------------------------


@dataclass
class TensordWeightTransferInitInfo(WeightTransferInitInfo):
    """``init_weight_transfer_engine({"init_info": {...}})``: the default set name and the
    daemon (default: ``TENSORD_SOCKET`` / ``TENSORD_ADDR`` / ``TENSORD_TOKEN``)."""

    name: str | None = None
    socket: str | None = None
    address: str | None = None
    token: str | None = None


@dataclass
class TensordWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    """``update_weights({"update_info": {"name": ..., "version": ...}})``: a whole set (Hugging
    Face names, as the trainer ``put`` it); version default: the latest."""

    name: str | None = None
    version: int | str | None = None


class TensordWeightTransferEngine(WeightTransferEngine[TensordWeightTransferInitInfo, TensordWeightTransferUpdateInfo]):
    """``weight_transfer_config={"backend": "tensord"}``: the trainer ``sdk.put``s its weights;
    each worker pulls the version named in ``update_weights`` into its parameters through the
    model's ``load_weights`` under vLLM's layer-wise reload (so kernels' repacked layouts are
    rebuilt exactly as at startup). Reads are zero-copy views when the set is on this node;
    they stay open until ``finish_weight_update``."""

    init_info_cls = TensordWeightTransferInitInfo
    update_info_cls = TensordWeightTransferUpdateInfo
    supports_draft_weight_update = True

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self._init = TensordWeightTransferInitInfo()
        self._client: sdk.Client | None = None
        self._updater: WeightUpdater | None = None

    def init_transfer_engine(self, init_info: TensordWeightTransferInitInfo) -> None:
        """Nothing to rendezvous: remember the default name and daemon."""
        self._init = init_info
        self._close_client()

    def _connect(self) -> sdk.Client:
        if self._client is None:
            i = self._init
            self._client = sdk.Client(i.socket, address=i.address, token=i.token)
        return self._client

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        vllm_mount.refuse_if_mounted(self.model, "take weight updates")
        if self._updater is not None:  # an update that never finished
            self._updater.abort()
        from vllm.distributed import get_tensor_model_parallel_world_size

        model, model_config = self.model, self.model_config
        packed, tp_size = dict(getattr(model, "packed_modules_mapping", {})), get_tensor_model_parallel_world_size()

        def finish() -> None:
            finalize_layerwise_reload(model, model_config)
            # A tied layer loaded nothing, so vLLM did not process it again: its kernel still
            # holds what it built from the old weight.
            reprocess_tied(model)

        self._updater = WeightUpdater(
            model,
            self._connect(),
            device=self.device,
            name=self._init.name,
            load_weights=self._load,
            on_start=lambda: initialize_layerwise_reload(model),
            on_finish=finish,
            packed=packed,
            tp_size=tp_size,
            check=lambda tensors, ties: kernel_problems(model, tensors, ties=ties, packed=packed, tp_size=tp_size),
        )
        self._updater.start()

    def _load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check

        with disable_mtp_completeness_check():
            self.model.load_weights(weights)

    def receive_weights(self, update_info: TensordWeightTransferUpdateInfo) -> None:
        if self._updater is None:
            raise RuntimeError("tensord: start_weight_update() before update_weights()")
        try:
            self._updater.update(update_info.name, update_info.version)
        except BaseException:  # vLLM ends the update session on an error: let go of the reads
            self._updater.abort()
            self._updater = None
            raise

    def finish_weight_update(self) -> None:
        updater, self._updater = self._updater, None
        if updater is not None:
            loaded = updater.finish()
            if loaded is not None:
                log.info("tensord: the engine now serves %s v%d", *loaded)

    def shutdown(self) -> None:
        if self._updater is not None:
            self._updater.abort()
            self._updater = None
        self._close_client()

    def _close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def update(llm: Any, name: str, version: int | str | None = None, *, client: sdk.Client | None = None) -> int:
    """One RL update of a running `vllm.LLM` from tensord: start, pull `version` (default: the
    latest, resolved once through `client`, default `sdk.default_client()`) of `name`, finish,
    and record it as the engine's weight version. Returns the version. A version the engine's
    parameters do not match after the update raises (`sdk.IntegrityError` inside vLLM's error)
    with the previous version restored; an error while reading ends the update session and
    leaves the parameters undefined: update again before serving."""
    if not isinstance(version, int):
        version = int((client if client is not None else sdk.default_client()).info(name, version)["version"])
    llm.start_weight_update()
    llm.update_weights({"update_info": {"name": name, "version": version}})
    llm.finish_weight_update(weight_version=str(version))
    return version


def follow(
    llm: Any, name: str, *, after: int | None = None, timeout: float | None = None, client: sdk.Client | None = None
) -> Iterator[int]:
    """Drive a running `vllm.LLM` from `sdk.watch`: yield each version of `name` once the engine
    serves it. Stops after `timeout` seconds without a new version (None: never)."""
    watcher = client if client is not None else sdk.default_client()
    for version in watcher.watch(name, after=after, timeout=timeout):
        update(llm, name, version, client=watcher)
        yield version


# -- registration ----------------------------------------------------------------------------


def _route_logs() -> None:
    """Our log lines go where vLLM's go (vLLM configures only its own logger)."""
    ours, theirs = logging.getLogger("sdk.engines"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(theirs.getEffectiveLevel())
        ours.propagate = False


def _check_before_start() -> None:
    """Run `preflight` where vLLM turns its arguments into a config (in the process that
    starts the engine), so a bad option, an unreachable daemon or (strict) a missing set fails
    before any model is built."""
    from vllm.engine.arg_utils import EngineArgs

    create = EngineArgs.create_load_config
    if getattr(create, "_tensord_checked", False):
        return

    @functools.wraps(create)
    def create_load_config(self: Any) -> Any:
        if str(self.load_format).lower() == LOAD_FORMAT:
            preflight(self.model_loader_extra_config, tp_size=int(self.tensor_parallel_size))
        return create(self)

    create_load_config._tensord_checked = True  # type: ignore[attr-defined]
    EngineArgs.create_load_config = create_load_config


_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the loader and the backend (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.model_executor.model_loader import register_model_loader

    _route_logs()
    _check_before_start()
    reprocess_tied_after_reloads()
    register_model_loader(LOAD_FORMAT)(TensordModelLoader)
    with contextlib.suppress(ValueError):  # registered already in this process
        WeightTransferEngineFactory.register_engine(BACKEND, TensordWeightTransferEngine)
