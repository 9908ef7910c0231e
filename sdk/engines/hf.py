"""Hugging Face Transformers without an engine: build a model from its config and fill it from a
set (``sdk.load_into``, one copy into the parameters).

    from transformers import AutoModelForCausalLM
    from sdk.engines.hf import from_set
    model = from_set("/models/llama-8b", "llama-8b", model_class=AutoModelForCausalLM, device="cuda:0")

The set holds the checkpoint's tensors by their Hugging Face names (what ``tensord load`` makes
of the model's safetensors, or a trainer's ``sdk.put(name, model.state_dict())``). Imports
``transformers`` only here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

import sdk
from tensord_contract.errors import InvalidArgument

log = logging.getLogger(__name__)


def from_set(
    config: Any,
    name: str,
    version: int | str | None = None,
    *,
    model_class: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    verify: bool = False,
    client: sdk.Client | None = None,
) -> torch.nn.Module:
    """A model of `model_class` (default ``transformers.AutoModel``) built from `config` (a
    ``PretrainedConfig`` or a directory/id that ``AutoConfig`` reads) on `device`, without
    random initialisation, filled from version `version` (default: latest) of set `name`.

    Tensors of the set that the model does not have (e.g. a checkpoint's non-persistent
    buffers) are ignored. `strict`: every parameter must come from the set (tied parameters
    count once), else `sdk.InvalidArgument` names the missing ones. Returns the model in eval
    mode.
    """
    import transformers

    if not isinstance(config, transformers.PretrainedConfig):
        config = transformers.AutoConfig.from_pretrained(config)
    cls = model_class if model_class is not None else transformers.AutoModel
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    with _no_init(), torch.device(device):
        model = cls.from_config(config, **kwargs)
    c = client if client is not None else sdk.default_client()
    info = c.info(name, version, tensors=True)
    version, names = int(info["version"]), set(info["tensors"])
    missing = sorted(n for n, _ in model.named_parameters() if n not in names)
    if strict and missing:
        raise InvalidArgument(
            f"{name} lacks {len(missing)} parameter(s) of {type(model).__name__}: {missing[:5]}",
            name=name,
        )
    loaded = c.load_into(model, name, version, strict=False, verify=verify)
    if missing:
        log.warning("%s v%d lacks %d parameter(s), left as initialised: %s", name, loaded, len(missing), missing[:5])
    log.info("built %s from %s v%d", type(model).__name__, name, loaded)
    return model.eval()


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """Skip the random initialisation of weights that the set overwrites anyway."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # type: ignore[attr-defined,no-redef]
        except ImportError:
            yield
            return
    with no_init_weights():
        yield
