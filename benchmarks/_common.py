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
