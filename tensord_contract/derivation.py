"""What a derived set was made from, as written in its version's ``origin``: the format engines
write (`sdk.engines.derived`) and tools read (`tensord ls`, `tensord info`), with no torch.

A rank set ``NAME/tp{rank}`` that an engine published records the whole set and version it
loaded (or the model's files) and the `EngineKey` of the engine that converted it. An engine
set ``NAME/tp{rank}/processed`` (engines that mount their parameters) records the same, plus the
`platform` its tensors were post-processed for: kernels repack weights per device kind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

PREFIX = "derived "
FILES = "files:"  # a source that is a model directory, not a set


@dataclass(frozen=True)
class EngineKey:
    """What must match for one engine's parameters to fit another: a rank set in one engine's
    layout is only valid for an engine of the same key."""

    engine: str  # e.g. "vllm 0.32.0"
    tp_size: int
    tp_rank: int
    dtype: str  # e.g. "float32"
    quantization: str | None = None


@dataclass(frozen=True)
class Derivation:
    """Where a rank set's tensors came from: `source` (a whole set's name, or ``files:DIR``)
    at `version` (0 for files), converted by an engine of `key` (None: not recorded), and
    post-processed for `platform` (None: in the engine's loading layout, not post-processed)."""

    source: str
    version: int
    key: EngineKey | None = None
    platform: str | None = None

    def to_origin(self) -> str:
        data = asdict(self)
        if self.platform is None:  # what older readers expect
            del data["platform"]
        return PREFIX + json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_origin(cls, origin: object) -> Derivation | None:
        """The derivation an origin records; None when it records none or is malformed."""
        if not isinstance(origin, str) or not origin.startswith(PREFIX):
            return None
        try:
            data = json.loads(origin[len(PREFIX) :])
            key, platform = data.get("key"), data.get("platform")
            if platform is not None and not isinstance(platform, str):
                return None
            key = None if key is None else EngineKey(**key)
            return cls(str(data["source"]), int(data["version"]), key, platform)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def describe(self) -> str:
        where = self.source if self.source.startswith(FILES) else f"{self.source} v{self.version}"
        if self.key is None:
            return where
        k = self.key
        quant = k.quantization or "none"
        processed = "" if self.platform is None else f", processed for {self.platform}"
        return f"{where} by {k.engine} (tp {k.tp_rank}/{k.tp_size}, {k.dtype}, quantization {quant}{processed})"
