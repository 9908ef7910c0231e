"""A small engine-style model for the engine tests that need no engine: parameters in the
engine's own layout (q, k and v fused, column- and row-parallel shards of one tensor-parallel
rank) and a ``load_weights`` that converts checkpoint names the way vLLM's models do."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

H = 64  # hidden size


def checkpoint(seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint with Hugging Face-style names and full shapes."""
    g = torch.Generator().manual_seed(seed)
    names = {"q.weight": (H, H), "k.weight": (H, H), "v.weight": (H, H), "o.weight": (H, H), "norm.weight": (H,)}
    return {k: torch.randn(shape, generator=g).to(device) for k, shape in names.items()}


class EngineModel(nn.Module):
    """One rank of `tp`: ``qkv`` fuses this rank's rows of q, k and v; ``o`` holds its columns."""

    def __init__(self, *, tp: int = 1, rank: int = 0, device: str = "cpu") -> None:
        super().__init__()
        self.tp, self.rank, self.part = tp, rank, H // tp
        self.qkv = nn.Parameter(torch.full((3 * self.part, H), float("nan"), device=device), requires_grad=False)
        self.o = nn.Parameter(torch.full((H, self.part), float("nan"), device=device), requires_grad=False)
        self.norm = nn.Parameter(torch.full((H,), float("nan"), device=device), requires_grad=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        p, start = self.part, self.rank * self.part
        for name, t in weights:
            if name in ("q.weight", "k.weight", "v.weight"):
                i = "qkv".index(name[0])
                self.qkv.data[i * p : (i + 1) * p].copy_(t.narrow(0, start, p))
                loaded.add("qkv")
            elif name == "o.weight":
                self.o.data.copy_(t.narrow(1, start, p))
                loaded.add("o")
            elif name == "norm.weight":
                self.norm.data.copy_(t)
                loaded.add("norm")
        return loaded

    def expected(self, ckpt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What `load_weights(ckpt)` must leave in the parameters."""
        p, start = self.part, self.rank * self.part
        return {
            "qkv": torch.cat([ckpt[f"{c}.weight"].narrow(0, start, p) for c in "qkv"]),
            "o": ckpt["o.weight"].narrow(1, start, p),
            "norm": ckpt["norm.weight"],
        }

    def equals(self, ckpt: dict[str, torch.Tensor]) -> bool:
        got = dict(self.named_parameters())
        return all(torch.equal(got[k].cpu(), v.cpu()) for k, v in self.expected(ckpt).items())


class BufferingModel(EngineModel):
    """Keeps the tensors it is given and copies them only at `flush()`, as vLLM's layer-wise
    reload does until ``finish_weight_update``: the views it was given must stay valid."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.buffered: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        self.buffered.extend(weights)
        return set()

    def flush(self) -> None:
        buffered, self.buffered = self.buffered, []
        super().load_weights(buffered)


class LoaderStyleModel(EngineModel):
    """Loads as vLLM's models do: each parameter carries a ``weight_loader(param, tensor,
    shard)`` and ``load_weights`` finds parameters by name, so that vLLM's layer-wise reload
    (which swaps parameters out and wraps their loaders) can run around it."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.qkv.weight_loader = self._load_qkv  # type: ignore[attr-defined]
        self.o.weight_loader = self._load_o  # type: ignore[attr-defined]
        self.norm.weight_loader = self._load_whole  # type: ignore[attr-defined]

    def _load_qkv(self, param: torch.Tensor, t: torch.Tensor, shard: str) -> None:
        p, i = self.part, "qkv".index(shard)
        param.data[i * p : (i + 1) * p].copy_(t.narrow(0, self.rank * p, p))

    def _load_o(self, param: torch.Tensor, t: torch.Tensor) -> None:
        param.data.copy_(t.narrow(1, self.rank * self.part, self.part))

    @staticmethod
    def _load_whole(param: torch.Tensor, t: torch.Tensor) -> None:
        param.data.copy_(t)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, t in weights:
            if name in ("q.weight", "k.weight", "v.weight"):
                params["qkv"].weight_loader(params["qkv"], t, name[0])  # type: ignore[attr-defined]
                loaded.add("qkv")
            else:
                key = name.removesuffix(".weight")
                params[key].weight_loader(params[key], t)  # type: ignore[attr-defined]
                loaded.add(key)
        return loaded
