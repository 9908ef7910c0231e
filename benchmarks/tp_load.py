"""`tensord load --tp N` as typed against loading the same file whole, and the plan of a large
checkpoint's shards, same run.

    python benchmarks/tp_load.py [--gb 3] [--tp 4] [--runs 3] [--device cpu]

A Llama-like bf16 safetensors file (attention and MLP projections split by the built-in
`llama` rules: q/k/v/gate/up by rows, o/down by columns, so each rank's column shard is
thousands of runs of its file). Rows, medians after one warm-up, warm page cache:
- `tensord load FILE` whole (the limit: every byte of the file read once);
- `tensord load FILE --tp N` (N sets, filled in one pass over the file: the daemon's line says
  the bytes written into the ranks and the bytes read);
- planning a 70B-class Llama's shards at tp 8 from its headers alone (header-only files with
  holes; no data read): `plan_shards` and the chunks of one rank, per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import llm_shapes, start_daemon
from cli_load import median
from safetensors.torch import save_file

from tensord.checkpoint import read_checkpoint
from tensord.ingest.reads import plan_chunks
from tensord.sharding import builtin_rules, plan_shards
from tests.daemons import child_env


def header_only_checkpoint(directory: Path, shapes: dict[str, tuple[int, ...]], files: int) -> None:
    """A bf16 checkpoint directory whose files hold headers and holes (no data written)."""
    items = list(shapes.items())
    per = -(-len(items) // files)
    weight_map = {}
    for f in range(files):
        header, offset = {}, 0
        for name, shape in items[f * per : (f + 1) * per]:
            n = 2 * int(torch.Size(shape).numel())
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = f"model-{f:05d}.safetensors"
        raw = json.dumps(header).encode()
        with open(directory / f"model-{f:05d}.safetensors", "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            out.truncate(8 + len(raw) + offset)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=3.0)
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tensord-tp-load-"))
    path = work / "llama.safetensors"
    shapes = llm_shapes(int(args.gb * 1e9), hidden=2048, ffn=8192, vocab=32000)
    save_file({k: torch.randn(s).to(torch.bfloat16) for k, s in shapes.items()}, path)
    nbytes = os.path.getsize(path)
    daemon = start_daemon()
    try:
        env = child_env(TENSORD_SOCKET=daemon.socket)
        client = daemon.client()
        names = ["bench/tp"] + [f"bench/tp/tp{r}" for r in range(args.tp)]

        def delete() -> None:
            for n in names:
                if client.ls(n):
                    client.delete(n)

        def load(*extra: str) -> Callable[[], None]:
            cmd = [sys.executable, "-m", "tensord", "load", str(path), "--name", "bench/tp", "--device", args.device]
            return lambda: subprocess.run([*cmd, "-q", *extra], env=env, check=True, capture_output=True)

        whole = median(load(), args.runs, delete)
        split = median(load("--tp", str(args.tp)), args.runs, delete)
        gb = nbytes / 1e9
        print(f"{len(shapes)} tensors, {gb:.2f} GB, device {args.device}, warm page cache, median of {args.runs}")
        print(f"  tensord load as typed, whole (limit)   {whole:8.3f} s")
        print(f"  tensord load --tp {args.tp} as typed         {split:8.3f} s  {split / whole:5.2f}x the whole load")
        lines = daemon.log.read_text().splitlines()
        for line in [x for x in lines if "ingested" in x][-1:]:  # the last load (all its ranks), in the daemon
            print("  daemon:", line[line.find("ingested") :])
        phases = [x for x in lines if "headers" in x and "commit" in x]  # each load's, warm-ups first
        for line in phases[-2:]:
            print("  daemon:", line[line.find("load ") :])
        ingests = [float(x.split("ingest ")[1].split(" s")[0]) for x in phases]
        whole_in, split_in = (statistics.median(ingests[k + 1 : k + 1 + args.runs]) for k in (0, args.runs + 1))
        print(f"  daemon's ingest phase, medians: whole {whole_in:.3f} s, --tp {args.tp} {split_in:.3f} s", end="")
        print(f"  {split_in / whole_in:5.2f}x")
    finally:
        daemon.kill()
        path.unlink()

    big = work / "llama70b"
    big.mkdir()
    header_only_checkpoint(big, llm_shapes(int(140e9), hidden=8192, ffn=28672), files=30)
    t0 = time.perf_counter()
    tensors = read_checkpoint(big)
    headers = time.perf_counter() - t0
    rules = builtin_rules("llama")
    fds = {f: os.open(f, os.O_RDONLY) for f in {t.path for t in tensors}}
    try:
        t0 = time.perf_counter()
        plans = plan_shards(tensors, 3, 8, rules)
        planned = time.perf_counter() - t0
        chunks = plan_chunks(plans, fds, 32 << 20)
        chunked = time.perf_counter() - t0 - planned
    finally:
        for fd in fds.values():
            os.close(fd)
    runs = sum(p.runs.count for p in plans)
    print(f"70B-class Llama, {len(tensors)} tensors in 30 files (headers only), tp 8, rank 3: {runs} runs")
    ms = [f"{x * 1e3:.1f} ms" for x in (headers, planned, chunked)]
    print(f"  read headers {ms[0]}, plan_shards {ms[1]}, chunks of the rank {ms[2]} ({len(chunks)})")


if __name__ == "__main__":
    main()
