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
                 on a GPU one in-place Triton kernel, on the host large ones read in place,
                 small ones gathered into a buffer);
Then the ratio definition 3 / definition 2 in time (the target: at most 1.5) and each row
against the flat copy. Host runs add three cases, each against a plain memory read of the same
bytes (`np.add.reduce` of them as uint64, one buffer) in the same run:
  large buffer out of cache  `fingerprint` of one --large-mb buffer, torch's thread count;
  chunk in cache             `fingerprint_part` of one 4 MiB chunk already in cache, on one
                             thread (what host ingest computes per chunk while it reads);
  small tensors              `fingerprints` of --small separate tensors of 1..4096 bytes.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from _common import deepseek_shapes, median_seconds, random_tensors

from tensord_dataplane.fingerprint import fingerprint, fingerprint_part, fingerprints, slab_fingerprints
from tensord_dataplane.tensors import as_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=int, default=3000)
    p.add_argument("--gb", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--large-mb", type=int, default=256, help="the buffer out of cache (host rows)")
    p.add_argument("--small", type=int, default=50_000, help="small tensors (host rows)")
    p.add_argument("--threads", type=int, default=0, help="torch's thread count (0: as it is)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

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
        host_rows(a, slab)
    assert np.array_equal(slab_fingerprints(slab, offsets, sizes), np.array(fingerprints(tensors), dtype=np.uint64)), (
        "the slab and tensor paths disagree"
    )


def host_rows(a: argparse.Namespace, slab: torch.Tensor) -> None:
    """Definition 3 against definition 2 and against a plain read of the same bytes."""

    def compare(label: str, nbytes: int, read: float, v2: float, v3: float) -> None:
        print(f"  {label} ({nbytes / 1e6:.1f} MB)")
        for what, seconds in (("plain read (np.add.reduce, uint64)", read), ("definition 2", v2), ("definition 3", v3)):
            print(f"    {what:34s} {nbytes / seconds / 1e9:8.2f} GB/s  {seconds * 1e3:9.2f} ms")
        print(f"    {'time, definition 3 / 2':34s} {v3 / v2:8.2f}")
        print(f"    {'time, definition 3 / plain read':34s} {v3 / read:8.2f}")

    large = torch.randint(0, 256, (a.large_mb << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    words = large.numpy().view(np.uint64)
    compare(
        f"large buffer out of cache, {torch.get_num_threads()} threads",
        large.numel(),
        median_seconds(lambda: np.add.reduce(words), a.runs),
        median_seconds(lambda: fingerprint(large, version=2), a.runs),
        median_seconds(lambda: fingerprint(large, version=3), a.runs),
    )
    chunk = slab[: 4 << 20]
    cw = chunk.numpy().view(np.uint64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = max(20, a.runs)
    compare(
        "chunk in cache (fingerprint_part), 1 thread",
        chunk.numel(),
        median_seconds(lambda: np.add.reduce(cw), runs),
        median_seconds(lambda: fingerprint_part(chunk, 0, slab.numel(), version=2), runs),
        median_seconds(lambda: fingerprint_part(chunk, 0, slab.numel(), version=3), runs),
    )
    torch.set_num_threads(threads)
    rng = np.random.default_rng(2)
    dtypes = [torch.uint8, torch.bfloat16, torch.float32, torch.float64]
    small = []
    for i in range(a.small):
        dt = dtypes[i % len(dtypes)]
        small.append(torch.empty(max(1, int(rng.integers(1, 4097)) // dt.itemsize), dtype=dt))
    for t in small:
        as_bytes(t).copy_(torch.from_numpy(rng.integers(0, 256, t.numel() * t.element_size(), dtype=np.uint8)))
    nbytes = sum(t.numel() * t.element_size() for t in small)
    flat = rng.integers(0, 2**63, nbytes // 8, dtype=np.uint64)  # real pages, not the zero page
    compare(
        f"{a.small} small tensors (1..4096 bytes), {threads} threads; read: one buffer of their bytes",
        nbytes,
        median_seconds(lambda: np.add.reduce(flat), a.runs),
        median_seconds(lambda: fingerprints(small, version=2), a.runs),
        median_seconds(lambda: fingerprints(small, version=3), a.runs),
    )


if __name__ == "__main__":
    main()
