"""Real model shapes: every operation on a DeepSeek-like set of N tensors, against the limits.

    python benchmarks/shapes.py --tensors 90000 --gb 17.7 --device cuda:0     # one or two GPUs
    python benchmarks/shapes.py --tensors 50000 --gb 0.5                      # host slabs (CPU)

The set mixes fp8 expert weights with fp32 block scales, bf16 norms and embeddings (from a few
bytes to hundreds of MB per tensor; `_common.deepseek_shapes`), each tensor its own allocation
as in a loaded model. Limits measured in the same run on the same bytes: one flat copy of the
whole set, `torch._foreach_copy_` of the same (source, target) pairs, views of a flat buffer
built by `unbind`-like splitting, a peer copy onto the other GPU. tensord rows: put from the
tensors; info; reopening a cached version (open + release); mount (enter + one tensor); get on
the same device (and onto the other GPU); load_into existing tensors; get by a new client (its
first open carries the manifest); get plus building every view. Medians of --runs after a warm-up.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _common import deepseek_shapes, median_seconds, profile, random_tensors, start_daemon, sync

from tensord_dataplane.copy import engine_name
from tensord_dataplane.tensors import as_bytes


def line(label: str, seconds: float, nbytes: int, limit: float | None = None, target: str = "") -> None:
    ratio = f"{seconds / limit:7.2f}x limit" if limit else " " * 13
    rate = f"{nbytes / seconds / 1e9:8.1f} GB/s" if nbytes else " " * 13
    print(f"  {label:<52} {seconds * 1e3:10.2f} ms {rate} {ratio}  {target}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", type=int, default=50_000)
    p.add_argument("--gb", type=float, default=None, help="set size in GB (default: 0.5 on cpu, 17.7 on GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also profile one steady put and load_into")
    args = p.parse_args()
    device = args.device
    gb = args.gb if args.gb is not None else (0.5 if device == "cpu" else 17.7)
    shapes = deepseek_shapes(args.tensors, int(gb * 1e9))
    src = random_tensors(shapes, device)
    sync()
    nbytes = sum(t.nbytes for t in src.values())
    where = torch.cuda.get_device_name(0) if device.startswith("cuda") else "host memory"
    print(
        f"{len(src)} DeepSeek-like tensors, {nbytes / 1e9:.2f} GB, {min(t.nbytes for t in src.values())} B to "
        f"{max(t.nbytes for t in src.values()) / 1e6:.0f} MB each, on {device} ({where}); GPU copy engine: "
        f"{engine_name() if device.startswith('cuda') else 'host memmove'}; time / limit (lower is better)"
    )
    flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    one_copy = median_seconds(lambda: flat.clone(), args.runs)
    line("limit: one flat copy of the bytes (clone)", one_copy, nbytes)
    targets = {k: torch.empty_like(t) for k, t in src.items()}
    tlist, slist = list(targets.values()), list(src.values())
    foreach = median_seconds(lambda: torch._foreach_copy_(tlist, slist), args.runs)
    line("limit: torch._foreach_copy_ of the (source, target) pairs", foreach, nbytes)
    sizes = [t.nbytes for t in src.values()]
    unbind = median_seconds(lambda: flat.split(sizes), args.runs)
    line("limit: split a flat buffer into one view per tensor", unbind, 0)
    flat = torch.empty(0, device=device)  # the memory goes back
    gc.collect()

    daemon = start_daemon(env={"TENSORD_LOG_LEVEL": "warning"})
    try:
        with daemon.client() as client:
            put = median_seconds(
                lambda: client.put("bench/shapes", src), args.runs, setup=lambda: client.delete("bench/shapes")
            )
            line(
                "tensord put (vs _foreach_copy_)",
                put,
                nbytes,
                foreach,
                "target <= 150 ms (90k, H200)" if device != "cpu" else "target <= 1 s (50k, CPU)",
            )
            info = median_seconds(lambda: client.info("bench/shapes"), args.runs * 4)
            line("tensord info", info, 0, None, "target <= 20 ms")

            def reopen() -> None:
                pin, _, slab = client._open("bench/shapes", None)
                slab.close()
                client._release(pin, wait=False)

            line(
                "tensord reopen of a cached version (open + release)",
                median_seconds(reopen, args.runs * 4),
                0,
                None,
                "target <= 2 ms",
            )

            def mount() -> None:
                with client.mount("bench/shapes") as m:
                    m.tensors["lm_head.weight"]

            line(
                "tensord mount (enter + one tensor)",
                median_seconds(mount, args.runs * 4),
                0,
                None,
                "target <= 50 ms (90k) / 0.15 s (CPU)",
            )
            get = median_seconds(lambda: client.get("bench/shapes"), args.runs)
            line(
                "tensord get, same device (vs one flat copy)",
                get,
                nbytes,
                one_copy,
                "target <= 100 ms (90k, H200) / 0.4 s (CPU)",
            )
            load = median_seconds(lambda: client.load_into(targets, "bench/shapes"), args.runs)
            line("tensord load_into existing tensors (vs _foreach_copy_)", load, nbytes, foreach, "target <= 1.3x")
            if args.profile:  # where a steady put and load_into spend their time
                client.delete("bench/shapes")  # as the put row: a second 20 GB version may not fit
                profile("put", lambda: client.put("bench/shapes", src))
                profile("load_into", lambda: client.load_into(targets, "bench/shapes"))

            def cold_get() -> None:
                with daemon.client() as fresh:
                    fresh.get("bench/shapes")

            line("tensord get by a new client (manifest sent)", median_seconds(cold_get, args.runs), nbytes, one_copy)

            def get_all_views() -> None:
                got = client.get("bench/shapes")
                for _ in got.values():
                    pass

            line("tensord get + build every view", median_seconds(get_all_views, args.runs), nbytes, one_copy)
            if device.startswith("cuda") and torch.cuda.device_count() > 1:
                other = "cuda:1" if device != "cuda:1" else "cuda:0"
                far_flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
                peer = median_seconds(lambda: far_flat.to(other), args.runs)
                line(f"limit: one peer copy {device} -> {other}", peer, nbytes)
                del far_flat
                far = median_seconds(lambda: client.get("bench/shapes", device=other), args.runs)
                line(f"tensord get onto {other} (vs one peer copy)", far, nbytes, peer, "target <= 1.3x")
                far_targets = {k: torch.empty_like(t, device=other) for k, t in src.items()}
                far_load = median_seconds(lambda: client.load_into(far_targets, "bench/shapes"), args.runs)
                line(f"tensord load_into on {other} (vs one peer copy)", far_load, nbytes, peer)
                del far_targets
            got = client.get("bench/shapes", verify=True)
            sample = list(src.items())[:: max(1, len(src) // 500)]
            assert all(torch.equal(as_bytes(got[k]), as_bytes(t)) for k, t in sample)
            verify = median_seconds(lambda: client.get("bench/shapes", verify=True), args.runs)
            line("tensord get with verify=True (fingerprints in bulk)", verify, nbytes, one_copy)
    finally:
        daemon.stop()
    sync()
    print(f"(done at {time.strftime('%Y-%m-%d %H:%M:%S')})")


if __name__ == "__main__":
    main()
