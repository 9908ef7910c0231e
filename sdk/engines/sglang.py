"""SGLang integration — written against SGLang 0.5's hooks but NOT yet run against SGLang (it
cannot run on this project's CPU machines, and its GPU host has none): not a supported feature
until it has been. docs/ENGINES.md says how to try it.

- `TensordLoader`: a model loader class for SGLang's ``load_format`` (from Python only:
  ``sgl.Engine(..., load_format=TensordLoader, model_loader_extra_config={"name": ...})``).
  Every rank reads the whole set ``NAME`` through the model's ``load_weights`` (rank sets hold
  vLLM's layout and are not used), else the model's files, after which the first rank publishes
  the checkpoint it read (any ``publish`` but false); ``strict`` fails instead.
- `update_from_tensord`: a ``--custom-weight-loader`` for ``update_weights_from_tensor``; the
  trainer sends a tiny directive (`request`) instead of the weights, and every rank pulls the
  version from tensord:

      engine.update_weights_from_tensor(named_tensors=request("policy", 7),
                                        load_format="sdk.engines.sglang.update_from_tensord")

`update_from_tensord` and `request` need no SGLang; `TensordLoader` imports it on first use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from typing import Any

import torch

import sdk
from sdk.engines.common import Capture, EngineOptions, load_set, read_set
from tensord_contract.errors import InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

PREFIX = "tensord:"  # names of directive tensors: "tensord:NAME", value = version (0: latest)


def request(name: str, version: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The ``named_tensors`` that ask `update_from_tensord` to load `version` (default: the
    latest) of set `name`: one int64 scalar, so nothing but the request crosses to the engine."""
    if version is not None and (not isinstance(version, int) or version < 1):
        raise InvalidArgument(f"version must be a positive integer, not {version!r}")
    return [(PREFIX + name, torch.tensor(0 if version is None else version, dtype=torch.int64))]


def update_from_tensord(
    model: torch.nn.Module, named_tensors: Iterable[tuple[str, torch.Tensor]], *, client: sdk.Client | None = None
) -> None:
    """``--custom-weight-loader sdk.engines.sglang.update_from_tensord``: for each directive of
    `request`, read that version (zero-copy when it is on this node; the daemon from
    ``TENSORD_SOCKET`` / ``TENSORD_ADDR``) and pass it to ``model.load_weights``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    client = client if client is not None else sdk.default_client()
    for key, value in named_tensors:
        if not key.startswith(PREFIX) or value.numel() != 1:
            raise InvalidArgument(f"not a tensord request: {key!r} (make them with sdk.engines.sglang.request)")
        name, version = key[len(PREFIX) :], int(value.item())
        with read_set(client, name, version or None, device=device) as (loaded, tensors):
            model.load_weights(tensors.items())  # type: ignore[operator]
        log.info("tensord: the engine now holds %s v%d", name, loaded)


def _options(load_config: Any) -> EngineOptions:
    extra = load_config.model_loader_extra_config
    return EngineOptions.from_config(json.loads(extra) if isinstance(extra, str) else extra)


def _build_loader() -> type:
    from sglang.srt.configs.load_config import LoadFormat
    from sglang.srt.distributed import get_tensor_model_parallel_rank
    from sglang.srt.model_loader.loader import DefaultModelLoader, _get_quantization_config, _initialize_model
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    class TensordLoader(DefaultModelLoader):
        """SGLang ``load_format=TensordLoader``; options in ``model_loader_extra_config``."""

        def __init__(self, load_config: Any) -> None:
            self.options = _options(load_config)
            files = dataclasses.replace(load_config, load_format=LoadFormat.AUTO, model_loader_extra_config={})
            super().__init__(files)

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: the weights come from tensord."""

        def load_model(self, *, model_config: Any, device_config: Any) -> torch.nn.Module:
            device = torch.device(device_config.device)
            rank = get_tensor_model_parallel_rank()
            quant_config = _get_quantization_config(model_config, self.load_config)
            with set_default_torch_dtype(model_config.dtype):
                with device:
                    model = _initialize_model(model_config, self.load_config, quant_config)
                with self.options.client() as client:
                    try:
                        load_set(
                            model,
                            self.options,
                            rank=rank,
                            device=device,
                            load_weights=lambda w: self.load_weights_and_postprocess(model, w, device),
                            client=client,
                            kinds=("whole",),
                        )
                    except (NotFound, Unavailable) as exc:
                        if self.options.strict:
                            raise
                        log.warning("%s; loading %s from its files (strict is off)", exc, model_config.model_path)
                        self._load_files(model, model_config, device, client, rank)
            return model.eval()

        def _load_files(self, model: Any, model_config: Any, device: Any, client: sdk.Client, rank: int) -> None:
            capture = Capture() if self.options.publish_mode is not None and rank == 0 else None
            weights = self._get_all_weights(model_config, model)
            self.load_weights_and_postprocess(model, weights if capture is None else capture.wrap(weights), device)
            if capture is not None:
                capture.publish(client, self.options.name)

    return TensordLoader


_loader: type | None = None


def __getattr__(name: str) -> Any:
    """`TensordLoader` is built (and SGLang imported) on first access."""
    global _loader
    if name == "TensordLoader":
        if _loader is None:
            _loader = _build_loader()
        return _loader
    raise AttributeError(name)
