"""Shared pieces of the benchmarks: a daemon, LLM-shaped sets, timing with medians."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.daemons import DaemonProcess  # noqa: E402


def start_daemon(**kw: object) -> DaemonProcess:
    return DaemonProcess(Path(tempfile.mkdtemp(prefix="tensord-bench-")), "bench", **kw).start()  # type: ignore[arg-type]


def llm_shapes(
    total_bytes: int, hidden: int = 4096, ffn: int = 14336, vocab: int = 128256
) -> dict[str, tuple[int, ...]]:
    """Llama-like bf16 tensor shapes adding up to about `total_bytes` (~9 tensors a layer)."""
    layer = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (hidden // 4, hidden),
        "self_attn.v_proj.weight": (hidden // 4, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    per_layer = sum(2 * _numel(s) for s in layer.values())
    ends = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    layers = max(1, (total_bytes - sum(2 * _numel(s) for s in ends.values())) // per_layer)
    shapes = {f"model.layers.{i}.{k}": s for i in range(layers) for k, s in layer.items()}
    return {**shapes, **ends}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def random_set(shapes: dict[str, tuple[int, ...]], device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return {
        k: torch.randn(s, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16) for k, s in shapes.items()
    }


def sync() -> None:
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def median_seconds(
    fn: Callable[[], object], runs: int, warmup: int = 1, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of `fn` (GPU work included); `setup` runs untimed before each call."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
        sync()
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def row(label: str, nbytes: int, seconds: float, limit: float | None = None) -> str:
    ratio = f"{limit / seconds:6.2f}x" if limit else "      "
    return f"  {label:<48} {seconds * 1e3:10.2f} ms {nbytes / seconds / 1e9:9.2f} GB/s  {ratio}"


#: bytes per element of the dtypes the model-shaped sets use
_ITEMSIZE = {"float8_e4m3fn": 1, "bfloat16": 2, "float32": 4}


def deepseek_shapes(tensors: int, total_bytes: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A DeepSeek-V3-like shard: name -> (dtype, shape), about `tensors` tensors, `total_bytes` bytes.

    Per MoE layer: MLA attention projections in fp8 with fp32 block scales, bf16 norms, a bf16
    router with an fp32 bias, and E routed experts plus one shared expert, each with gate, up and
    down projections in fp8 and a block scale per weight; then bf16 embeddings and lm_head (about
    5% of the bytes). Sizes therefore run from a few bytes (scales, norms) to hundreds of MB
    (embeddings), as in the real model; hidden and expert sizes are scaled to the requested bytes.
    """
    experts = 256 if tensors >= 20_000 else max(4, tensors // 80)
    layers = max(1, round((tensors - 3) / (6 * (experts + 1) + 15)))
    target = 0.95 * total_bytes / (layers * (experts + 1) * 3)  # bytes of one fp8 expert projection
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for _ in range(4):  # the attention and embeddings grow with `hidden`: correct a few times
        hidden = max(256, min(7168, int((target * 3.5) ** 0.5) // 64 * 64))
        inter = max(64, int(target / hidden) // 16 * 16)
        shapes = _deepseek_layout(layers, experts, hidden, inter, int(0.025 * total_bytes / (hidden * 2)))
        target *= total_bytes / shapes_bytes(shapes)
    return shapes


def _deepseek_layout(
    layers: int, experts: int, hidden: int, inter: int, vocab: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    def scale(rows: int, cols: int) -> tuple[str, tuple[int, ...]]:
        return "float32", (-(-rows // 128), -(-cols // 128))

    out: dict[str, tuple[str, tuple[int, ...]]] = {"model.embed_tokens.weight": ("bfloat16", (max(vocab, 1), hidden))}
    q_lora, kv_lora = min(1536, hidden), min(512, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        attn = {
            "q_a_proj": (q_lora, hidden),
            "q_b_proj": (hidden, q_lora),
            "kv_a_proj_with_mqa": (kv_lora + 64, hidden),
            "kv_b_proj": (hidden, kv_lora),
            "o_proj": (hidden, hidden),
        }
        for k, (r, c) in attn.items():
            out[f"{p}self_attn.{k}.weight"] = ("float8_e4m3fn", (r, c))
            out[f"{p}self_attn.{k}.weight_scale_inv"] = scale(r, c)
        out[f"{p}self_attn.q_a_layernorm.weight"] = ("bfloat16", (q_lora,))
        out[f"{p}self_attn.kv_a_layernorm.weight"] = ("bfloat16", (kv_lora,))
        out[f"{p}input_layernorm.weight"] = ("bfloat16", (hidden,))
        out[f"{p}post_attention_layernorm.weight"] = ("bfloat16", (hidden,))
        out[f"{p}mlp.gate.weight"] = ("bfloat16", (experts, hidden))
        out[f"{p}mlp.gate.e_score_correction_bias"] = ("float32", (experts,))
        for e in [*(f"experts.{j}" for j in range(experts)), "shared_experts"]:
            for proj, (r, c) in (
                ("gate_proj", (inter, hidden)),
                ("up_proj", (inter, hidden)),
                ("down_proj", (hidden, inter)),
            ):
                out[f"{p}mlp.{e}.{proj}.weight"] = ("float8_e4m3fn", (r, c))
                out[f"{p}mlp.{e}.{proj}.weight_scale_inv"] = scale(r, c)
    out["model.norm.weight"] = ("bfloat16", (hidden,))
    out["lm_head.weight"] = ("bfloat16", (max(vocab, 1), hidden))
    return out


def shapes_bytes(shapes: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    return sum(_ITEMSIZE[d] * _numel(s) for d, s in shapes.values())


def random_tensors(shapes: dict[str, tuple[str, tuple[int, ...]]], device: str) -> dict[str, torch.Tensor]:
    """Random tensors of these (dtype, shape) as separate allocations, like a loaded model's."""
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for k, (dtype, shape) in shapes.items():
        nbytes = _ITEMSIZE[dtype] * _numel(shape)
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=g)
        out[k] = raw.view(getattr(torch, dtype)).view(shape)
    return out


def profile(label: str, call: Callable[[], object], top: int = 18) -> None:
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    call()
    sync()
    prof.disable()
    print(f"== profile of one {label}: top {top} by own time, then by time inside")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
