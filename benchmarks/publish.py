"""Publishing without a copy (`sdk.Client.publish`) against a copy into the daemon (`put`), on
DeepSeek-like sets of N tensors in the publisher's GPU memory (each its own allocation, as in
a loaded model):

    python benchmarks/publish.py --tensors 300 --gb 17.7 --device cuda:0
    python benchmarks/publish.py --tensors 90000 --gb 17.7 --device cuda:0

Publisher rows (this process): put (copy into a daemon slab) and publish (no copy), their ratio,
GPU memory the daemon holds for each, unpublish. Reader rows, each from a fresh process (as an
engine starting up): the first `get` of the published set (its allocations are mapped then)
and of the put copy (after a first mount, which maps the memory), a second `get` of each
(mappings kept), mount, load_into, each against one flat copy of the same bytes in that
process (the limit). Medians of --runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _common import deepseek_shapes, median_seconds, profile, random_tensors, start_daemon, sync

import sdk
from tensord_dataplane.fingerprint import fingerprints
from tensord_dataplane.published_ipc import export
from tensord_dataplane.sources import places
from tensord_dataplane.tensors import describe

READER = r"""
import json, sys, time, torch, sdk
sys.path.insert(0, sys.argv[4])
from _common import median_seconds, sync
socket, name, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sdk.Client(socket)
torch.cuda.init(); torch.empty(1, device="cuda:0"); sync()
t0 = time.perf_counter()
with c.mount(name) as m:
    first_name = next(iter(m.tensors))
first_mount = time.perf_counter() - t0
t0 = time.perf_counter(); got = c.get(name); sync(); first = time.perf_counter() - t0
nbytes = sum(t.nbytes for t in got.values())
flat = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
out = {"first_mount": first_mount, "first_get": first, "nbytes": nbytes,
       "clone": median_seconds(lambda: flat.clone(), runs),
       "get": median_seconds(lambda: c.get(name), runs)}
def mount():
    with c.mount(name) as m:
        m.tensors[first_name]
out["mount"] = median_seconds(mount, runs)
target = {k: torch.empty_like(t) for k, t in got.items()}
out["load_into"] = median_seconds(lambda: c.load_into(target, name), runs)
print(json.dumps(out), flush=True)
"""


def line(label: str, seconds: float, nbytes: int = 0, limit: float | None = None) -> None:
    ratio = f"{seconds / limit:7.2f}x limit" if limit else ""
    rate = f"{nbytes / seconds / 1e9:8.1f} GB/s" if nbytes else " " * 13
    print(f"  {label:<56} {seconds * 1e3:10.2f} ms {rate} {ratio}", flush=True)


def foreach_copy(src: dict[str, torch.Tensor], runs: int) -> float:
    targets, sources = [torch.empty_like(t) for t in src.values()], list(src.values())
    return median_seconds(lambda: torch._foreach_copy_(targets, sources), runs)


def reader(socket: str, name: str, runs: int) -> dict[str, float]:
    here = str(__import__("pathlib").Path(__file__).resolve().parent)
    out = subprocess.run(
        [sys.executable, "-c", READER, socket, name, str(runs), here], capture_output=True, text=True, timeout=500
    )
    if out.returncode:
        raise SystemExit(f"reader failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", type=int, default=300)
    p.add_argument("--gb", type=float, default=17.7)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also profile one publish of the same memory again")
    args = p.parse_args()
    src = random_tensors(deepseek_shapes(args.tensors, int(args.gb * 1e9)), args.device)
    sync()
    nbytes = sum(t.nbytes for t in src.values())
    print(f"{len(src)} DeepSeek-like tensors, {nbytes / 1e9:.2f} GB on {args.device} ({torch.cuda.get_device_name(0)})")
    daemon = start_daemon()
    try:
        with sdk.Client(daemon.socket) as c:
            line("limit: torch._foreach_copy_ of the tensors (a copy)", foreach_copy(src, args.runs), nbytes)
            put = median_seconds(lambda: c.put("bench/copy", src), args.runs, setup=lambda: c.delete("bench/copy"))
            line("put: a copy into a daemon slab", put, nbytes)
            used = c.status()["devices"][args.device]["used"]
            c.delete("bench/copy")
            publish = median_seconds(lambda: c.publish("bench/pub", src).unpublish(), args.runs)
            line("publish + unpublish (no reader): no copy", publish, 0, put)
            if args.profile:
                profile("publish again", lambda: c.publish("bench/pub", src).unpublish())
            t0 = time.perf_counter()
            exported = export(places(describe(src.values(), copy_sparse=False), list(src)))
            line(f"  of which: export {len(exported.handles)} allocations (IPC handles)", time.perf_counter() - t0)
            t0 = time.perf_counter()
            fingerprints(list(src.values()))
            sync()
            line("  of which: fingerprints (in place, one kernel)", time.perf_counter() - t0)
            pub = c.publish("bench/pub", src)
            print(
                f"  daemon GPU memory held: put {used / 1e9:.2f} GB, published "
                f"{c.status()['devices'][args.device]['used'] / 1e9:.2f} GB",
                flush=True,
            )
            c.put("bench/copy", src)
            for label, name in (
                ("published (publisher's memory)", "bench/pub"),
                ("put copy (daemon slab)", "bench/copy"),
            ):
                r = reader(daemon.socket, name, args.runs)
                print(f"  reader, fresh process, {label}:", flush=True)
                line("    first mount (manifest, maps the memory)", r["first_mount"])
                line("    first get (loads the copy kernel)", r["first_get"], r["nbytes"], r["clone"])
                line("    get", r["get"], r["nbytes"], r["clone"])
                line("    mount (enter + one tensor + close)", r["mount"])
                line("    load_into existing tensors", r["load_into"], r["nbytes"], r["clone"])
                line("    limit: one flat clone of the bytes", r["clone"], r["nbytes"])
            t0 = time.perf_counter()
            assert pub.unpublish()
            line("unpublish (readers gone)", time.perf_counter() - t0)
    finally:
        daemon.kill()


if __name__ == "__main__":
    main()
