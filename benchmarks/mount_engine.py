"""Engine-style processes that mount (issue 22 item 2, without an engine): a first process moves
a model's tensors into the store as an engine set; a fresh process builds the same model on the
meta device and binds views of it. What the fresh process pays, against the limits measured in
the same run: memory added on the device (limit 0) and time to a usable model (against one
flat copy of the set's bytes, what the cheapest private load would cost).

    .venv/bin/python benchmarks/mount_engine.py [--device cuda:0] [--tensors 90000] [--gb 2]

The model: a DeepSeek-like shard (`_common.deepseek_shapes`) as an nn.Module tree, every tensor
its own allocation. Medians of --runs fresh processes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402
from _common import REPO, deepseek_shapes, random_tensors, shapes_bytes, start_daemon  # noqa: E402
from torch import nn  # noqa: E402

import sdk  # noqa: E402
from sdk.engines import handover  # noqa: E402
from sdk.engines.engine_sets import (  # noqa: E402
    LAYOUT,
    bind,
    export,
    layout_tensor,
    meta_left,
    read_layout,
    release_unused,
)

NAME = "bench-mount/tp0/processed"


def build(shapes: dict[str, tuple[str, tuple[int, ...]]], device: str) -> nn.Module:
    """An nn.Module tree with one parameter per name, uninitialised on `device`."""
    root = nn.Module()
    for name, (dtype, shape) in shapes.items():
        path, leaf = name.rsplit(".", 1)
        module = root
        for part in path.split("."):
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]  # type: ignore[assignment]
        empty = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        module.register_parameter(leaf, nn.Parameter(empty, requires_grad=False))
    return root


def device_used(device: str) -> int:
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return total - free
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
    return 0


def first(socket: str, device: str, tensors: int, nbytes: int) -> dict[str, float]:
    shapes = deepseek_shapes(tensors, nbytes)
    model = build(shapes, device)
    with torch.no_grad():
        for t, src in zip(model.parameters(), random_tensors(shapes, device).values(), strict=True):
            t.copy_(src)
    tensors_, layout = export(model)
    tensors_[LAYOUT] = layout_tensor(layout, torch.device(device))
    release_unused()  # the random sources' memory is not the model's
    before = device_used(device)
    t = time.perf_counter()
    with sdk.Client(socket) as c:
        version = handover.move(c, NAME, model, tensors_, origin="bench")
    seconds = time.perf_counter() - t
    del tensors_
    release_unused()  # as an engine does after its hand-over
    return {"version": version, "move": seconds, "freed": before - device_used(device)}


def later(socket: str, device: str, tensors: int, nbytes: int) -> dict[str, float]:
    if device.startswith("cuda"):
        torch.cuda.init()
        torch.zeros(1, device=device)
    ready = time.perf_counter()
    shapes = deepseek_shapes(tensors, nbytes)
    with torch.device("meta"):
        model = build(shapes, "meta")
    built = time.perf_counter()
    before = device_used(device)
    c = sdk.Client(socket)
    mount = c.mount(NAME)
    bind(model, mount.tensors, read_layout(mount.tensors, NAME), NAME)
    assert not meta_left(model)
    bound = time.perf_counter()
    out = {"init": ready - START, "build": built - ready, "mount_bind": bound - built}
    out["added"] = device_used(device) - before
    # The limit: one flat copy of the set's bytes on the device.
    flat = torch.empty(int(mount.manifest.nbytes), dtype=torch.uint8, device=device)
    src = torch.empty_like(flat)
    copies = []
    for _ in range(3):
        t = time.perf_counter()
        flat.copy_(src)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        copies.append(time.perf_counter() - t)
    out["flat_copy"] = min(copies)
    mount.close()
    c.close()
    return out


def run(role: str, socket: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--role", role, "--socket", socket, "--device", args.device,
           "--tensors", str(args.tensors), "--gb", str(args.gb)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{role} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tensors", type=int, default=90_000)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--role", choices=["first", "later"])
    parser.add_argument("--socket")
    args = parser.parse_args()
    nbytes = int(args.gb * 1e9)
    if args.role is not None:
        fn = first if args.role == "first" else later
        print(json.dumps(fn(args.socket, args.device, args.tensors, nbytes)))
        return
    daemon = start_daemon()
    try:
        made = run("first", daemon.socket, args)
        runs = [run("later", daemon.socket, args) for _ in range(args.runs)]
    finally:
        daemon.kill()
    shapes = deepseek_shapes(args.tensors, nbytes)
    m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    total = shapes_bytes(shapes)
    print(f"{len(shapes)} tensors, {total / 1e9:.2f} GB on {args.device}; medians of {args.runs} fresh processes")
    grew = -made["freed"]  # the device as a whole (the engine and the daemon): 0 when the set only moved
    print(f"first process: moved into the store in {made['move']:.2f} s; the device's used memory changed by "
          f"{grew / 1e9:+.2f} GB ({grew / total:+.2f}x the set; +1.00x would be a second copy)")  # fmt: skip
    print(f"later process: import + device init {m['init']:.2f} s, meta model {m['build']:.2f} s, "
          f"mount + bind {m['mount_bind'] * 1e3:.0f} ms = {m['mount_bind'] / m['flat_copy']:.2f}x one flat copy "
          f"({m['flat_copy'] * 1e3:.0f} ms)")  # fmt: skip
    print(f"memory it added on {args.device}: {m['added'] / 1e6:.1f} MB = {100 * m['added'] / total:.2f}% of the set "
          f"(limit 0)")  # fmt: skip


if __name__ == "__main__":
    main()
