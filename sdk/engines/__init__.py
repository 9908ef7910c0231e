"""Engine integrations: inference engines load from tensord, trainers push into running engines.

One module per engine, each importing its engine only inside itself, so ``import sdk`` and
``import sdk.engines`` stay light:

- `sdk.engines.vllm`: the ``tensord`` model loader (``--load-format tensord``) and weight-transfer
  backend, registered through the ``vllm.general_plugins`` entry point;
- `sdk.engines.sglang`: a loader class for SGLang's ``load_format`` and a
  ``--custom-weight-loader`` function (not yet run against SGLang: see docs/ENGINES.md);
- `sdk.engines.hf`: build a Hugging Face model from its config and fill it from a set;
- `sdk.engines.common`: what they share (options, finding and reading sets, publishing, updates).
"""

from sdk.engines.common import EngineOptions, Found, load_set, publish_params, rank_set, unpublish_params
from sdk.engines.derived import Derivation, EngineKey
from sdk.engines.updates import WeightUpdater

__all__ = [
    "Derivation",
    "EngineKey",
    "EngineOptions",
    "Found",
    "WeightUpdater",
    "load_set",
    "publish_params",
    "rank_set",
    "unpublish_params",
]
