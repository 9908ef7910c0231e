"""Where the time of one `get` goes, phase by phase (GPU or CPU slabs).

python benchmarks/profile_get.py --device cuda:0 --gib 16
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from _common import llm_shapes, random_set, start_daemon, sync

from sdk.tensors import to_dtype


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--gib", type=float, default=1.0)
    args = p.parse_args()
    daemon = start_daemon(env={"TENSORD_LOG_LEVEL": "warning"})
    try:
        with daemon.client() as c:
            src = random_set(llm_shapes(int(args.gib * 2**30)), args.device)
            c.put("p", src, device=args.device)
            phases: dict[str, list[float]] = {}
            for _ in range(7):
                sync()
                marks = [("start", time.perf_counter())]
                pin, manifest, slab = c._open("p", None)
                marks.append(("open (rpc + manifest + slab)", time.perf_counter()))
                out = {
                    s.name: torch.empty(s.shape, dtype=to_dtype(s.dtype), device=args.device) for s in manifest.tensors
                }
                marks.append(("allocate", time.perf_counter()))
                views = [slab.view(s) for s in manifest.tensors]
                marks.append(("views", time.perf_counter()))
                for v, s in zip(views, manifest.tensors, strict=True):
                    out[s.name].copy_(v)
                marks.append(("launch copies", time.perf_counter()))
                slab.finish()
                marks.append(("finish (sync)", time.perf_counter()))
                slab.close()
                c._release(pin)
                marks.append(("release", time.perf_counter()))
                for (_, a), (label, b) in itertools.pairwise(marks):
                    phases.setdefault(label, []).append(b - a)
            for label, values in phases.items():
                print(f"  {label:<32} {statistics.median(values[2:]) * 1e3:8.3f} ms")
            import cProfile
            import pstats

            for _ in range(3):
                c.get("p", device=args.device)
            sync()
            t0 = time.perf_counter()
            c.get("p", device=args.device)
            sync()
            print(f"  client.get end to end           {(time.perf_counter() - t0) * 1e3:8.3f} ms")
            profile = cProfile.Profile()
            profile.runcall(lambda: (c.get("p", device=args.device), sync()))
            pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
