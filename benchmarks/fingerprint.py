"""Fingerprint throughput: definition 3 (mixed, position-keyed words) against definition 2 (the
linear block sum it replaces), on a DeepSeek-like set (each tensor its own allocation, sizes
from bytes to the embeddings' hundreds of MB, mixed dtypes, shuffled order):

    python benchmarks/fingerprint.py --tensors 3000 --gb 0.5            # host rows
    python benchmarks/fingerprint.py --tensors 90000 --gb 17.7 --device cuda:0

Rows, each the median of --runs after a warm-up, in GB/s of tensor bytes:
  flat copy      one copy of the same bytes in one buffer (the limit: a pass over memory);
  slab           `slab_fingerprints` over the set laid out as a slab (what puts, pulls,
                 restores and ingest-to-GPU compute);
  tensors        `fingerprints` of the separate tensors (what verify and publish compute:
                 on a GPU one in-place Triton kernel, on the host gathered into a buffer);
  chunk in cache `fingerprint_part` of one 4 MiB chunk already in cache, on one thread (what
                 host ingest computes per chunk while it reads; host rows only).
Then the ratio definition 3 / definition 2 in time (the target: at most 1.5) and each row
against the flat copy.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from _common import deepseek_shapes, median_seconds, random_tensors

from tensord_dataplane.fingerprint import fingerprint_part, fingerprints, slab_fingerprints
from tensord_dataplane.tensors import as_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, default=3000)
    p.add_argument("--gb", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()

    shapes = list(deepseek_shapes(a.tensors, int(a.gb * 1e9)).items())
    random.Random(0).shuffle(shapes)
    tensors = list(random_tensors(dict(shapes), a.device).values())
    sizes = np.array([t.numel() * t.element_size() for t in tensors], dtype=np.int64)
    total = int(sizes.sum())
    aligned = (sizes + 255) // 256 * 256
    offsets = np.cumsum(aligned) - aligned
    slab = torch.empty(int(aligned.sum()), dtype=torch.uint8, device=a.device)
    for o, t in zip(offsets.tolist(), tensors, strict=True):
        slab[o : o + t.numel() * t.element_size()] = as_bytes(t)
    flat_src = torch.empty(total, dtype=torch.uint8, device=a.device)
    flat_dst = torch.empty_like(flat_src)
    print(f"{len(tensors)} tensors, {total / 1e9:.3f} GB on {a.device} (torch threads: {torch.get_num_threads()})")

    def rate(seconds: float) -> float:
        return total / seconds / 1e9

    copy = median_seconds(lambda: flat_dst.copy_(flat_src), a.runs)
    print(f"  {'flat copy (the limit)':36s} {rate(copy):8.2f} GB/s")
    rows: dict[tuple[str, int], float] = {}
    for what in ("slab", "tensors"):
        for version in (2, 3):
            if what == "slab":
                fn = lambda v=version: slab_fingerprints(slab, offsets, sizes, version=v)  # noqa: E731
            else:
                fn = lambda v=version: fingerprints(tensors, version=v)  # noqa: E731
            seconds = median_seconds(fn, a.runs)
            rows[what, version] = seconds
            print(
                f"  {what + f' definition {version}':36s} {rate(seconds):8.2f} GB/s"
                f"  ({copy / seconds:5.2f} x the flat copy)"
            )
        ratio = rows[what, 3] / rows[what, 2]
        verdict = "within" if ratio <= 1.5 else "OVER"
        print(f"  {what + ' time, definition 3 / 2':36s} {ratio:8.2f}    ({verdict} the 1.5 target)")
    if a.device == "cpu":
        chunk = slab[: 4 << 20]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        in_cache = {
            v: median_seconds(lambda v=v: fingerprint_part(chunk, 0, slab.numel(), version=v), 20) for v in (2, 3)
        }
        torch.set_num_threads(threads)
        for version, seconds in in_cache.items():
            print(f"  {f'chunk in cache definition {version}':36s} {chunk.numel() / seconds / 1e9:8.2f} GB/s")
        print(f"  {'chunk in cache time, definition 3 / 2':36s} {in_cache[3] / in_cache[2]:8.2f}")
    assert np.array_equal(slab_fingerprints(slab, offsets, sizes), np.array(fingerprints(tensors), dtype=np.uint64)), (
        "the slab and tensor paths disagree"
    )


if __name__ == "__main__":
    main()
