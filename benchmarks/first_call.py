"""First calls in fresh processes: each operation's first call, its second, and its steady state.

    python benchmarks/first_call.py                                     # CPU: host set, small
    python benchmarks/first_call.py --device cuda:0 --tensors 90000 --gb 20

A set is put once (by this process). Then, per operation, a new Python process imports sdk
and torch, makes its tensors (CUDA is initialised there, untimed: an engine or trainer has
already done it) and times its first call, its second and the median of --runs more: `put`
(16 small tensors, as a trainer's first step of a small model, and the whole shard), `get`,
`get` of a few names (the batched copy), `load_into` (a dict and an nn.Module), `mount`
(enter plus one tensor), `info(tensors=True)`. It prints whether Triton was imported (a
kernel compiled, or loaded from Triton's cache) during the first call. `--profile`: the first
call of each is profiled instead (the rows then time its second call as 'first').
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from _common import REPO, deepseek_shapes, profile, start_daemon, sync
from rl_sync import module_of, tensors_of

import sdk

NAME = "bench/first"
OPS = ["put16", "put", "get", "get_names", "load_into", "load_into_module", "mount", "info"]


def child(args: argparse.Namespace) -> None:
    shapes = deepseek_shapes(args.tensors, int(args.gb * 1e9))
    device = args.device
    small = {f"w{i}": torch.ones(64, 64, device=device) for i in range(16)}
    tensors = tensors_of(shapes, device, seed=3) if args.op in ("put", "load_into", "load_into_module") else {}
    model = module_of(tensors) if args.op == "load_into_module" else None
    names = list(shapes)[:: max(1, len(shapes) // 64)]
    sync()
    client = sdk.Client()
    calls: dict[str, Callable[[], object]] = {
        "put16": lambda: client.put("bench/first16", small),
        "put": lambda: client.put("bench/first-put", tensors),
        "get": lambda: client.get(NAME, device=device),
        "get_names": lambda: client.get(NAME, device=device, names=names),
        "load_into": lambda: client.load_into(tensors, NAME),
        "load_into_module": lambda: client.load_into(model, NAME),  # type: ignore[arg-type]
        "mount": lambda: _mount(client, names[0]),
        "info": lambda: client.info(NAME, tensors=True),
    }
    fn = calls[args.op]
    times = []
    if args.profile:  # the first call, profiled (to stderr), instead of timed
        with contextlib.redirect_stdout(sys.stderr):
            profile(f"first {args.op}", fn, top=30)
    for i in range(2 + args.runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0:
            triton = "triton" in sys.modules
    print(json.dumps({"times": times, "triton": triton}), flush=True)
    client.close()


def _mount(client: sdk.Client, name: str) -> None:
    with client.mount(NAME) as m:
        m.tensors[name].sum()  # one tensor's view, touched


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--op", default="")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensors", type=int, default=2000)
    p.add_argument("--gb", type=float, default=0.05)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--profile", action="store_true", help="profile each first call (printed, not timed)")
    args = p.parse_args()
    if args.op:
        child(args)
        return
    daemon = start_daemon(env={"TENSORD_RETENTION": "2"})
    os.environ["TENSORD_SOCKET"] = daemon.socket
    try:
        shapes = deepseek_shapes(args.tensors, int(args.gb * 1e9))
        src = tensors_of(shapes, args.device, seed=1)
        for t in src.values():
            t.view(torch.uint8).random_(0, 256)
        with sdk.Client() as client:
            client.put(NAME, src)
        nbytes = sum(t.nbytes for t in src.values())
        del src
        where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "host memory"
        print(f"{len(shapes)} tensors, {nbytes / 1e9:.2f} GB on {args.device} ({where}); fresh process per row")
        print(f"  {'operation':<18} {'first':>10} {'second':>10} {'steady':>10} {'first-steady':>13}  triton at first")
        env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
        for op in args.ops.split(","):
            cmd = [sys.executable, __file__, "--op", op, "--device", args.device]
            cmd += ["--tensors", str(args.tensors), "--gb", str(args.gb), "--runs", str(args.runs)]
            cmd += ["--profile"] if args.profile else []
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
            if out.returncode != 0:
                print(f"  {op:<18} failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            if args.profile:
                print(out.stderr, flush=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            t = got["times"]
            steady = statistics.median(t[2:])
            print(
                f"  {op:<18} {t[0] * 1e3:8.1f}ms {t[1] * 1e3:8.1f}ms {steady * 1e3:8.1f}ms "
                f"{(t[0] - steady) * 1e3:11.1f}ms  {'yes' if got['triton'] else 'no'}",
                flush=True,
            )
    finally:
        daemon.kill()


if __name__ == "__main__":
    main()
