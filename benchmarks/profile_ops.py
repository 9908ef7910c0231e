"""Where the time of put, load_into and a first get goes on a many-tensor set (cProfile).

    python benchmarks/profile_ops.py --tensors 90000 --gb 17.7 --device cuda:0

Diagnostic: prints each operation's wall time and its costliest functions (own time).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from _common import deepseek_shapes, random_tensors, start_daemon, sync


def profiled(label: str, fn, top: int) -> None:  # type: ignore[no-untyped-def]
    fn()
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    sync()
    prof.disable()
    wall = time.perf_counter() - t0
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    lines = [
        line for line in out.getvalue().splitlines() if line.strip() and not line.startswith(("   Ordered", "   List"))
    ]
    print(f"== {label}: {wall * 1e3:.1f} ms (profiled)")
    print("\n".join(lines[2:]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", type=int, default=90_000)
    p.add_argument("--gb", type=float, default=17.7)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--top", type=int, default=14)
    args = p.parse_args()
    src = random_tensors(deepseek_shapes(args.tensors, int(args.gb * 1e9)), args.device)
    targets = {k: torch.empty_like(t) for k, t in src.items()}
    daemon = start_daemon(env={"TENSORD_LOG_LEVEL": "warning"})
    try:
        with daemon.client() as client:
            profiled("put", lambda: (client.delete("p"), client.put("p", src)), args.top)
            profiled("load_into", lambda: client.load_into(targets, "p"), args.top)

            def first_get() -> None:
                with daemon.client() as fresh:
                    fresh.get("p")

            profiled("get by a new client", first_get, args.top)
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
