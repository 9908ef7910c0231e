"""Host slabs and GPUs: a DeepSeek-like shard held in a host slab, loaded into GPU parameters,
got onto cuda:0 and put from GPU tensors, against one pinned host<->device copy of the same
bytes measured in the same run (target: at least 0.8x its speed), the pageable figures beside.

    python benchmarks/host_slabs.py                # 9,000 tensors, 2.07 GB
    python benchmarks/host_slabs.py --full         # 89,762 tensors, 20.7 GB (issue 22's shard)

Every tensor is its own allocation, allocated in shuffled order; the parameters are allocated
in another. Copy paths (`TENSORD_HOST_COPY`): pinned (the slab page-locked in this process;
the first read pays the registration, later reads reuse it), bounce (two pinned buffers of this
process, no registration), direct (the batched copy kernel reads the registered slab), pageable
(the path before). Ratios are limit time / time: 1.0 = the speed of one pinned copy.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable

import torch
from _common import deepseek_shapes, random_tensors, shapes_bytes, start_daemon, sync

from tensord_dataplane import pinned as pinning
from tensord_dataplane.fingerprint import fingerprints


def timed(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def report(label: str, seconds: list[float], nbytes: int, limit: float | None) -> None:
    best = sorted(seconds)[len(seconds) // 2]
    ratio = f"{limit / best:6.2f}x of pinned" if limit else ""
    runs = " ".join(f"{s:.3f}" for s in seconds)
    print(f"  {label:<46} {best:8.3f} s {nbytes / best / 1e9:7.1f} GB/s {ratio:>17}   runs: {runs}", flush=True)


def limits(nbytes: int, runs: int) -> tuple[list[float], ...]:
    """One copy of the same bytes between a flat GPU buffer and pinned, then pageable, memory."""
    flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    t0 = time.perf_counter()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    print(f"  (allocating {nbytes / 1e9:.1f} GB of pinned host memory took {time.perf_counter() - t0:.2f} s)")
    h2d = [timed(lambda: flat.copy_(host, non_blocking=True)) for _ in range(runs)]
    d2h = [timed(lambda: host.copy_(flat, non_blocking=True)) for _ in range(runs)]
    host = torch.empty(0, dtype=torch.uint8)
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # give the pinned memory back before the slabs need it
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)
    h2d_pageable = [timed(lambda: flat.copy_(pageable)) for _ in range(2)]
    d2h_pageable = [timed(lambda: pageable.copy_(flat)) for _ in range(2)]
    return h2d, d2h, h2d_pageable, d2h_pageable


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", type=int, default=9_000)
    p.add_argument("--gb", type=float, default=2.07)
    p.add_argument("--full", action="store_true", help="the issue's shard: 89,762 tensors, 20.7 GB")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-pageable-put", action="store_true", help="the slowest row (25 s at full size)")
    args = p.parse_args()
    tensors, gb = (89_762, 20.7) if args.full else (args.tensors, args.gb)
    shapes = deepseek_shapes(tensors, int(gb * 1e9))
    names = list(shapes)
    random.Random(0).shuffle(names)
    src = random_tensors({k: shapes[k] for k in names}, "cuda:0")  # allocated in shuffled order
    nbytes = shapes_bytes(shapes)
    gpu = torch.cuda.get_device_name(0)
    print(f"{len(src)} DeepSeek-like tensors, {nbytes / 1e9:.2f} GB, each its own allocation, on {gpu}")

    h2d, d2h, h2d_pageable, d2h_pageable = limits(nbytes, args.runs)
    h2d_limit, d2h_limit = sorted(h2d)[len(h2d) // 2], sorted(d2h)[len(d2h) // 2]
    report("limit: one pinned host->device copy", h2d, nbytes, h2d_limit)
    report("limit: one pinned device->host copy", d2h, nbytes, d2h_limit)
    report("pageable host->device copy", h2d_pageable, nbytes, h2d_limit)
    report("pageable device->host copy", d2h_pageable, nbytes, d2h_limit)

    order = list(shapes)
    random.Random(1).shuffle(order)
    params = {k: torch.empty_like(src[k]) for k in order}  # another allocation order
    want = fingerprints(list(src.values()))
    budget = f'[memory]\nbudgets = {{ cpu = "{max(16, int(nbytes * 2.6 / 2**30))}GiB" }}\nretention = 1\n'
    daemon = start_daemon(config=budget)
    try:
        with daemon.client() as c:

            def put() -> object:
                return c.put("shard", src, device="cpu")

            def load() -> object:
                return c.load_into(params, "shard")

            def get() -> object:
                return c.get("shard", device="cuda:0")

            def check(label: str, got: list[torch.Tensor]) -> None:
                bad = sum(a != b for a, b in zip(fingerprints(got), want, strict=True))
                print(f"    {label}: {'bit-exact' if bad == 0 else f'{bad} TENSORS DIFFER'}", flush=True)

            def in_mode(mode: str) -> None:
                os.environ["TENSORD_HOST_COPY"] = mode
                pinning.registrations.clear()

            in_mode("pinned")
            report("put from GPU tensors, pinned (registers)", [timed(put) for _ in range(2)], nbytes, d2h_limit)
            check("slab after put (get onto cuda:0)", _listed(get(), src))
            pinning.registrations.clear()
            first = timed(load)
            failure = pinning.registrations.failure
            print(f"    read-only registration: {'refused (' + failure + ')' if failure else 'works'}", flush=True)
            report("load_into GPU params, pinned, first read", [first], nbytes, h2d_limit)
            report("load_into GPU params, pinned, again", [timed(load) for _ in range(args.runs)], nbytes, h2d_limit)
            check("params after load_into", [params[k] for k in src])
            report("get onto cuda:0, pinned, again", [timed(get) for _ in range(args.runs)], nbytes, h2d_limit)

            in_mode("bounce")
            report("put from GPU tensors, bounce", [timed(put) for _ in range(2)], nbytes, d2h_limit)
            report("load_into GPU params, bounce", [timed(load) for _ in range(args.runs)], nbytes, h2d_limit)
            for t in params.values():
                t.zero_()
            load()
            check("params after load_into (bounce)", [params[k] for k in src])
            report("get onto cuda:0, bounce", [timed(get) for _ in range(args.runs)], nbytes, h2d_limit)
            check("get (bounce)", _listed(get(), src))

            os.environ["TENSORD_HOST_COPY"] = "direct"
            load()  # registers the slab the bounce puts wrote
            report("load_into GPU params, direct kernel", [timed(load)], nbytes, h2d_limit)

            os.environ["TENSORD_HOST_COPY"] = "pageable"
            report("load_into GPU params, pageable (before)", [timed(load)], nbytes, h2d_limit)
            report("get onto cuda:0, pageable (before)", [timed(get)], nbytes, h2d_limit)
            if not args.skip_pageable_put:
                in_mode("pageable")
                report("put from GPU tensors, pageable (before)", [timed(put)], nbytes, d2h_limit)
            os.environ["TENSORD_HOST_COPY"] = "pinned"
            pinning.registrations.clear()
    finally:
        daemon.kill()


def _listed(got: object, src: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [got[k] for k in src]  # type: ignore[index]


if __name__ == "__main__":
    main()
