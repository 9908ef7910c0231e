"""Core data-plane benchmark: mount latency, get/put/load_into against plain copies.

    python benchmarks/core.py                       # CPU: host-memory slabs
    python benchmarks/core.py --device cuda:0       # GPU slabs (+ the other GPU if present)

Every ratio compares tensord with a plain torch copy of the same bytes, measured in the same
run: `clone` (allocate + copy: what get must do) and `copy_` into existing tensors (what
load_into must do). Medians of --runs runs after a warm-up, random bf16 data.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from _common import llm_shapes, median_seconds, random_set, row, start_daemon, sync

import sdk


def mount_latency(client: sdk.Client, device: str, sizes_mib: list[int], runs: int) -> None:
    print(f"mount latency (open + map + views + release), {device} slabs, median of {runs}")
    for mib in sizes_mib:
        name = f"bench/mount-{mib}"
        client.put(name, {"x": torch.empty(mib << 20, dtype=torch.uint8, device=device)}, device=device)

        def mount(name: str = name) -> None:
            with client.mount(name) as m:
                m.tensors["x"]

        print(f"  {mib:>6} MiB: {median_seconds(mount, runs, warmup=3) * 1e3:7.3f} ms")
        client.delete(name)


def transfers(client: sdk.Client, device: str, gib: float, runs: int) -> None:
    shapes = llm_shapes(int(gib * 2**30))
    src = random_set(shapes, device)
    nbytes = sum(t.numel() * t.element_size() for t in src.values())
    print(
        f"\n{len(src)} LLM-shaped bf16 tensors, {nbytes / 2**30:.2f} GiB, slab on {device}; "
        "ratio = baseline time / tensord time"
    )
    clone = median_seconds(lambda: {k: t.clone() for k, t in src.items()}, runs)
    dst = {k: torch.empty_like(t) for k, t in src.items()}
    copy = median_seconds(lambda: [dst[k].copy_(t) for k, t in src.items()], runs)
    print(row("plain clone (allocate + copy)", nbytes, clone))
    print(row("plain copy_ into existing tensors", nbytes, copy))
    put = median_seconds(
        lambda: client.put("bench/set", src, device=device), runs, setup=lambda: client.delete("bench/set")
    )
    print(row("tensord put   (vs clone)", nbytes, put, clone))
    if device == "cpu":
        huge = client.status()["huge_pages"] >= nbytes
        print(f"  (the host slab lies in {'huge pages' if huge else '4 KiB pages: the kernel gives no huge pages'})")
    get = median_seconds(lambda: client.get("bench/set", device=device), runs)
    print(row("tensord get   (vs clone)", nbytes, get, clone))
    load = median_seconds(lambda: client.load_into(dst, "bench/set"), runs)
    print(row("tensord load_into (vs copy_)", nbytes, load, copy))
    if device.startswith("cuda") and torch.cuda.device_count() > 1:
        other = "cuda:1" if device != "cuda:1" else "cuda:0"
        peer = median_seconds(lambda: {k: t.to(other) for k, t in src.items()}, runs)
        far = {k: torch.empty_like(t, device=other) for k, t in src.items()}
        peer_copy = median_seconds(lambda: [far[k].copy_(t) for k, t in src.items()], runs)
        print(row(f"peer copy {device} -> {other} (allocate + copy)", nbytes, peer))
        print(row(f"peer copy_ {device} -> {other} into existing", nbytes, peer_copy))
        get_far = median_seconds(lambda: client.get("bench/set", device=other), runs)
        print(row(f"tensord get onto {other} (vs peer copy)", nbytes, get_far, peer))
        load_far = median_seconds(lambda: client.load_into(far, "bench/set"), runs)
        print(row(f"tensord load_into on {other} (vs peer copy_)", nbytes, load_far, peer_copy))
    # (src and dst are freed when this function returns)
    gc.collect()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--gib", type=float, default=None, help="set size (default: 2 on cpu, 16 on GPU)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--mount-sizes", default="1,64,1024,4096", help="MiB, comma-separated")
    args = p.parse_args()
    gib = args.gib if args.gib is not None else (2.0 if args.device == "cpu" else 16.0)
    daemon = start_daemon(env={"TENSORD_LOG_LEVEL": "warning"})
    try:
        with daemon.client() as client:
            mount_latency(client, args.device, [int(s) for s in args.mount_sizes.split(",")], 20)
            transfers(client, args.device, gib, args.runs)
    finally:
        daemon.stop()
    sync()
    print(f"\n(done at {time.strftime('%Y-%m-%d %H:%M:%S')})")


if __name__ == "__main__":
    main()
