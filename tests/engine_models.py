"""A small engine-style model for the engine tests that need no engine: parameters in the
engine's own layout (q, k and v fused, column- and row-parallel shards of one tensor-parallel
rank) and a ``load_weights`` that converts checkpoint names the way vLLM's models do."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

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


# -- a small Qwen2 decoder for the real vLLM engine ------------------------------------------

QWEN2 = {"hidden": 128, "intermediate": 256, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 512}


def qwen2_config(*, tied: bool) -> dict[str, object]:
    """A Qwen2 config (Hugging Face) for a model of `QWEN2`'s size, float32."""
    q = QWEN2
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": q["hidden"],
        "intermediate_size": q["intermediate"],
        "num_hidden_layers": q["layers"],
        "num_attention_heads": q["heads"],
        "num_key_value_heads": q["kv_heads"],
        "vocab_size": q["vocab"],
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def qwen2_weights(*, tied: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with Hugging Face names; no ``lm_head.weight`` when `tied`."""
    q, g = QWEN2, torch.Generator().manual_seed(seed)
    h, kv = q["hidden"], q["hidden"] // q["heads"] * q["kv_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (q["vocab"], h), "model.norm.weight": (h,)}
    for i in range(q["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (q["intermediate"], h), p + "mlp.up_proj.weight": (q["intermediate"], h),
            p + "mlp.down_proj.weight": (h, q["intermediate"]),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        }  # fmt: skip
    if not tied:
        shapes["lm_head.weight"] = (q["vocab"], h)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        out[name] = 1.0 + 0.1 * t if name.endswith("norm.weight") else 0.2 * t
    return out


def write_qwen2(directory: Path, *, tied: bool, seed: int | None) -> Path:
    """A model directory: config.json, and model.safetensors of `qwen2_weights` unless `seed`
    is None (a directory without weights, for loads from tensord)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(qwen2_config(tied=tied)))
    if seed is not None:
        save_file(qwen2_weights(tied=tied, seed=seed), str(directory / "model.safetensors"))
    return directory
