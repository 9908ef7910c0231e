"""Where the time of one `tensord load` to a GPU goes, phase by phase (diagnostic).

python benchmarks/profile_ingest.py --device cuda:0 --gib 4
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import start_daemon, sync
from ingest import generate

from tensord.checkpoint import read_checkpoint
from tensord.ingest import engine, reads
from tensord_dataplane.fingerprint import fingerprint_finish


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=8)
    args = p.parse_args()
    path = Path(tempfile.mkdtemp(prefix="tensord-prof-")) / "model.safetensors"
    generate(path, args.gib)
    daemon = start_daemon(env={"TENSORD_LOG_LEVEL": "warning"})
    phases: dict[str, list[float]] = {}
    try:
        with daemon.client() as c:
            for _ in range(5):
                marks = [("start", time.perf_counter())]
                tensors = read_checkpoint(path)
                marks.append(("read header", time.perf_counter()))
                r = c.reserve("p", {t.name: (t.dtype, t.shape) for t in tensors}, device=args.device)
                marks.append(("reserve + open slab", time.perf_counter()))
                specs = list(r.manifest.tensors)
                gpu = args.device.startswith("cuda")
                size = engine._chunk_size(r.slab, None)
                with reads.opened(tensors) as fds:
                    chunks = reads.plan_chunks(tensors, fds, size)
                    shares = engine._run(r.slab, specs, tensors, chunks, args.threads, size, None, hash_chunks=not gpu)
                marks.append(("read + copy pipeline", time.perf_counter()))
                if gpu:
                    fps = r.slab.fingerprints(r.manifest.offsets, r.manifest.sizes)
                else:
                    fps = np.array([fingerprint_finish(x, s.nbytes) for x, s in zip(shares, specs, strict=True)])
                marks.append(("fingerprints", time.perf_counter()))
                r.written_all(np.arange(len(specs)), np.asarray(fps, dtype=np.uint64))
                r.commit()
                marks.append(("commit", time.perf_counter()))
                c.delete("p")
                sync()
                for (_, a), (label, b) in itertools.pairwise(marks):
                    phases.setdefault(label, []).append(b - a)
        nbytes = sum(t.nbytes for t in tensors)
        total = sum(statistics.median(v[1:]) for v in phases.values())
        for label, values in phases.items():
            print(f"  {label:<28} {statistics.median(values[1:]) * 1e3:8.1f} ms")
        print(f"  total {total * 1e3:.1f} ms = {nbytes / total / 1e9:.2f} GB/s for {nbytes / 1e9:.2f} GB, "
              f"{len(tensors)} tensors, {args.threads} threads")  # fmt: skip
    finally:
        daemon.stop()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
