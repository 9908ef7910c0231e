"""RL weight sync, end to end: a trainer process `put`s its weights each step; an engine process,
following the set with `sdk.watch`, `load_into`s its own parameters. A step is timed from the
start of the trainer's put to the moment the engine's parameters hold the new version.

    python benchmarks/rl_sync.py                                        # CPU: host set, small
    python benchmarks/rl_sync.py --device cuda:0 --tensors 90000 --gb 20

Both sides hold a DeepSeek-like shard (`_common.deepseek_shapes`: fp8 weights, fp32 scales,
bf16 norms), every tensor its own allocation, made and listed in shuffled order. The limit,
measured in the same run on the same bytes: two flat copies (the trainer's into the store, the
store's into the engine). Then the same with an `nn.Module` on both sides (`put(name, module)`
in the trainer, `load_into(module)` in the engine: each walks its module's state_dict
entries). Medians over --steps after one warm-up step (which makes the copy plans; its time is
printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

import torch
from _common import REPO, deepseek_shapes, start_daemon, sync

import sdk

NAME = "bench/rl"


def tensors_of(shapes: dict[str, tuple[str, tuple[int, ...]]], device: str, seed: int) -> dict[str, torch.Tensor]:
    """Separate allocations, made and listed in a shuffled order."""
    keys = list(shapes)
    random.Random(seed).shuffle(keys)
    out = {}
    for k in keys:
        dtype, shape = shapes[k]
        out[k] = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    return out


def module_of(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree whose state_dict holds these tensors (as parameters) under their names."""
    root = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, torch.nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, torch.nn.Parameter(t, requires_grad=False))
    return root


def engine(args: argparse.Namespace) -> None:
    shapes = deepseek_shapes(args.tensors, int(args.gb * 1e9))
    targets = tensors_of(shapes, args.device, seed=2)
    target: dict[str, torch.Tensor] | torch.nn.Module = module_of(targets) if args.module else targets
    sync()
    with sdk.Client() as client:
        client.load_into(target, NAME)  # the warm-up version: the engine starts from it
        print(json.dumps({"ready": client.info(NAME)["latest"]}), flush=True)
        for version in client.watch(NAME, timeout=120):
            t0 = time.perf_counter()
            got = client.load_into(target, NAME, version=version)
            done = time.time()
            print(json.dumps({"version": got, "done": done, "load": time.perf_counter() - t0}), flush=True)
            if version >= args.last:
                return


def trainer(args: argparse.Namespace, module: bool) -> None:
    shapes = deepseek_shapes(args.tensors, int(args.gb * 1e9))
    src = tensors_of(shapes, args.device, seed=1)
    for t in src.values():
        t.view(torch.uint8).random_(0, 256) if t.element_size() == 1 else t.uniform_(-1, 1)
    model = module_of(src) if module else None
    nbytes = sum(t.nbytes for t in src.values())
    flat = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
    other = torch.empty_like(flat)
    sync()
    limit = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        other.copy_(flat)
        flat.copy_(other)
        sync()
        limit.append(time.perf_counter() - t0)
    del flat, other
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    two_copies = statistics.median(limit[1:])

    with sdk.Client() as client:
        first = client.put(NAME, src if model is None else model)
        env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
        cmd = [sys.executable, __file__, "--role", "engine", "--device", args.device, "--tensors", str(args.tensors)]
        cmd += ["--gb", str(args.gb), "--last", str(first + args.steps + 1)] + (["--module"] if module else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        json.loads(proc.stdout.readline())  # ready
        steps, puts, loads = [], [], []
        for _ in range(args.steps + 1):
            for t in list(src.values())[:64]:  # a training step changes the weights in place
                t.view(torch.uint8).add_(1)
            sync()
            start = time.time()
            t0 = time.perf_counter()
            version = client.put(NAME, src if model is None else model)
            puts.append(time.perf_counter() - t0)
            line = json.loads(proc.stdout.readline())
            assert line["version"] == version, line
            steps.append(line["done"] - start)
            loads.append(line["load"])
        proc.wait(timeout=60)
    what = (
        "nn.Module (put(module), load_into(module): their state_dict walks included)" if module else "dict of tensors"
    )
    print(
        f"{len(src)} tensors, {nbytes / 1e9:.2f} GB on {args.device}, {what}: RL step median "
        f"{statistics.median(steps[1:]) * 1e3:.1f} ms = {statistics.median(steps[1:]) / two_copies:.2f}x the limit "
        f"(two flat copies {two_copies * 1e3:.1f} ms); put {statistics.median(puts[1:]) * 1e3:.1f} ms, engine "
        f"load_into {statistics.median(loads[1:]) * 1e3:.1f} ms; first step {steps[0] * 1e3:.1f} ms "
        f"(put {puts[0] * 1e3:.1f}, load_into {loads[0] * 1e3:.1f}); steps (ms): "
        f"{[round(s * 1e3, 1) for s in steps]}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", default="main", choices=["main", "engine"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensors", type=int, default=2000)
    p.add_argument("--gb", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--last", type=int, default=0)
    p.add_argument("--module", action="store_true")
    p.add_argument("--no-module", action="store_true", help="skip the nn.Module run")
    args = p.parse_args()
    if args.role == "engine":
        engine(args)
        return
    daemon = start_daemon(env={"TENSORD_RETENTION": "2"})
    os.environ["TENSORD_SOCKET"] = daemon.socket
    try:
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            print(f"device: {torch.cuda.get_device_name(args.device)}", flush=True)
        trainer(args, module=False)
        if not args.no_module:
            trainer(args, module=True)
    finally:
        daemon.kill()


if __name__ == "__main__":
    main()
