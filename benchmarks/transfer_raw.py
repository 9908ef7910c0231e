"""Raw Mooncake TE read throughput between two processes: the limit other benchmarks compare to.

A holder process registers a buffer of random bytes; this process reads all of it in one batch
with 1 or more entries (entries map chunks in reverse order, so they cannot be coalesced).
Reports the median of --runs timed reads after --warmup, and a plain in-process copy of the same
bytes for scale. Example: ``.venv/bin/python benchmarks/transfer_raw.py --size-mib 256``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from _te_holder import Holder

from tensord_dataplane.transport.base import Entry
from tensord_dataplane.transport.mooncake import MooncakeTransport, available

MiB = 1 << 20


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _time(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--entries", default="1,16,256", help="comma-separated entry counts per batch")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--protocol", default="tcp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ok, why = available(args.protocol)
    if not ok:
        sys.exit(f"Mooncake {args.protocol} unavailable: {why}")
    size = args.size_mib * MiB
    counts = [int(c) for c in args.entries.split(",")]
    for n in counts:
        if n < 1 or size % n:
            sys.exit(f"--entries {n} must divide {size} bytes")

    load = os.getloadavg()
    local = torch.zeros(size, dtype=torch.uint8)
    scratch = torch.empty_like(local)
    rows = []
    with Holder(size, protocol=args.protocol) as holder, MooncakeTransport(protocol=args.protocol) as te:
        te.register(local.data_ptr(), size)
        expected = holder.sha256(0, size)
        for n in counts:
            chunk = size // n
            entries = [
                Entry(local.data_ptr() + i * chunk, holder.address + (n - 1 - i) * chunk, chunk) for i in range(n)
            ]
            local.zero_()
            times = _time(functools.partial(te.read, holder.session, entries), args.runs, args.warmup)
            got = hashlib.sha256(
                torch.cat([local[i * chunk : (i + 1) * chunk] for i in reversed(range(n))]).numpy().data
            )
            if got.hexdigest() != expected:
                sys.exit(f"data mismatch after reads with {n} entries")
            rows.append((f"TE {args.protocol} read, {n} entries", times))
        rows.append(("local copy (torch copy_)", _time(lambda: scratch.copy_(local), args.runs, args.warmup)))

    print(
        f"\n{args.size_mib} MiB random host memory, two processes on loopback, "
        f"median of {args.runs} after {args.warmup} warm-up (GB/s = 1e9 bytes/s)"
    )
    print(f"load average before/after: {load[0]:.2f} / {os.getloadavg()[0]:.2f} (busy machine: noisy)")
    print(f"{'what':<32} {'median s':>9} {'GB/s':>7} {'min':>7} {'max':>7}")
    for what, times in rows:
        med = statistics.median(times)
        print(
            f"{what:<32} {med:9.4f} {_gbps(size, med):7.2f} "
            f"{_gbps(size, max(times)):7.2f} {_gbps(size, min(times)):7.2f}"
        )


if __name__ == "__main__":
    main()
