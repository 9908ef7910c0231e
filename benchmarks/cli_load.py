"""`tensord load FILE` as typed (a fresh process, warm page cache) against the limits of the file.

    python benchmarks/cli_load.py [--gb 0.75] [--tensors 900] [--runs 5] [--device cpu]

The file is a DeepSeek-like safetensors checkpoint (mixed fp8 / bf16 / fp32 tensors, from a few
bytes to tens of MB). Rows, each the median of --runs after one warm-up, the page cache warm:
- the best raw read of the file: one thread and two threads preadv into one preallocated
  buffer (the limit), and into a new buffer each time (what first touching a slab's pages adds);
- `safetensors.torch.load_file` in a warm process (torch already imported); on the CPU it maps
  the file and reads no byte, so also with a copy of each tensor (the bytes in memory of their
  own, as in a slab);
- `tensord load` as typed: exec to exit of `python -m tensord load` against a live daemon (the
  command passes the opened file to the daemon, which reads it);
- the same load the way the command did it before (the client process imports torch and reads
  the file into the slab itself: still what it does against a daemon over TCP).
The set is deleted after every load.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _common import deepseek_shapes, random_tensors, shapes_bytes, start_daemon
from safetensors.torch import load_file, save_file

from tests.daemons import child_env

#: the command as it ran before: the client reads the file into the slab in its own process
BEFORE = (
    "import sys, argparse; from tensord.cli.files import _load_here;"
    "a = argparse.Namespace(socket=None, addr=None, token=None, path=sys.argv[1], name=sys.argv[2],"
    " device=sys.argv[3], threads=None, tp=None, rules=None, quiet=True); _load_here(a)"
)


def median(fn: Callable[[], object], runs: int, after: Callable[[], object] = lambda: None) -> float:
    fn()
    after()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        after()
    return statistics.median(times)


def raw_read(path: str, threads: int, *, fresh: bool = False) -> Callable[[], None]:
    """Read the whole file with `threads` readers into one buffer: the same buffer every time
    (its pages already mapped), or with `fresh` a new one (first touch of every page, as a
    load into a new slab pays)."""
    size = os.path.getsize(path)
    buf = np.empty(size, dtype=np.uint8)
    step = -(-size // threads)

    def part(i: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            view, at, end = memoryview(buf), i * step, min(size, (i + 1) * step)
            while at < end:
                at += os.preadv(fd, [view[at : min(end, at + (64 << 20))]], at)
        finally:
            os.close(fd)

    def read() -> None:
        nonlocal buf
        if fresh:
            buf = np.empty(size, dtype=np.uint8)
        pool = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    return read


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=0.75)
    parser.add_argument("--tensors", type=int, default=900)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tensord-cli-load-"))
    path = str(workdir / "ckpt.safetensors")
    shapes = deepseek_shapes(args.tensors, int(args.gb * 1e9))
    save_file(random_tensors(shapes, "cpu"), path)
    nbytes = shapes_bytes(shapes)
    daemon = start_daemon()
    try:
        env = child_env(TENSORD_SOCKET=daemon.socket)
        client = daemon.client()

        def delete() -> None:
            client.delete("bench/load")

        def command(cmd: list[str]) -> Callable[[], None]:
            return lambda: subprocess.run(cmd, env=env, check=True, capture_output=True)

        py = sys.executable
        steps: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            ("raw read, 1 thread (limit)", raw_read(path, 1), lambda: None),
            ("raw read, 2 threads (limit)", raw_read(path, 2), lambda: None),
            ("raw read, 2 threads, into new memory", raw_read(path, 2, fresh=True), lambda: None),
            ("load_file in a warm process", lambda: load_file(path, device=args.device), lambda: None),
            (
                "load_file + a copy of each tensor",
                lambda: [t.clone() for t in load_file(path, device=args.device).values()],
                lambda: None,
            ),
            (
                "tensord load as typed (passes the file)",
                command([py, "-m", "tensord", "load", path, "--name", "bench/load", "--device", args.device, "-q"]),
                delete,
            ),
            ("python -c pass (no work)", command([py, "-c", "pass"]), lambda: None),
            (
                "before: the command reads it itself",
                command([py, "-c", BEFORE, path, "bench/load", args.device]),
                delete,
            ),
        ]
        print(
            f"{len(shapes)} tensors, {nbytes / 1e9:.2f} GB, device {args.device}, warm page cache, "
            f"median of {args.runs}, {os.cpu_count()} CPUs; rows printed as they are measured",
            flush=True,
        )
        print(f"  {'':<42} {'seconds':>8} {'GB/s':>7} {'x raw read':>10} {'x load_file':>11}", flush=True)
        rows: dict[str, float] = {}
        for label, fn, after in steps:
            rows[label] = s = median(fn, args.runs, after)
            limit = min(rows["raw read, 1 thread (limit)"], rows.get("raw read, 2 threads (limit)", math.inf))
            load_file_s = rows.get("load_file in a warm process", math.nan)
            print(
                f"  {label:<42} {s:8.3f} {nbytes / s / 1e9:7.2f} {limit / s:10.2f} {load_file_s / s:11.2f}", flush=True
            )
        lines = daemon.log.read_text().splitlines()
        for line in [x for x in lines if "ingested" in x][-3:]:  # the daemon's own time (reads, copies, fingerprints)
            print("  daemon:", line[line.find("ingested") :])
        for line in [x for x in lines if "headers" in x and "commit" in x][-3:]:  # a load's phases in the daemon
            print("  daemon:", line[line.find("load ") :])
    finally:
        daemon.kill()
        os.unlink(path)


if __name__ == "__main__":
    main()
