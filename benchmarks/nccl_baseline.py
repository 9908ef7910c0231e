"""Bare NCCL send/recv between two processes, GPU0 -> GPU1: the limit for tensord's NCCL path.

    python benchmarks/nccl_baseline.py --gib 8                 # prints GB/s and group setup time
    python benchmarks/nccl_baseline.py --gib 8 --chunk-mib 1024 # the same bytes in chunks

Two processes (rank 0 on cuda:0 sends, rank 1 on cuda:1 receives), a TCPStore rendezvous and a
standalone ProcessGroupNCCL each, as tensord's pair groups are made (tensord/fleet/pairs.py).
One warm-up transfer, then the median of --runs timed ones (from both ranks' barrier to the
receiver's synchronize). `--chunk-mib` sends the buffer as consecutive slices, one send each,
the way a streaming pull moves chunks. Compare with:

    python benchmarks/fleet.py --protocol nccl --device cuda:0 --to cuda:1 --gib 8
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from datetime import timedelta
from typing import Any


def _rank(rank: int, port: int, nbytes: int, chunk: int, runs: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    t0 = time.perf_counter()
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 1, timeout=timedelta(seconds=120))
    pg = dist.ProcessGroupNCCL(dist.PrefixStore("baseline", store), rank, 2)
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if rank == 0:
        buf.random_(0, 256)
    first = torch.zeros(1, device=device)
    (pg.send([first], 1, 0) if rank == 0 else pg.recv([first], 0, 0)).wait()
    torch.cuda.synchronize(device)
    setup = time.perf_counter() - t0

    def once() -> float:
        flag = torch.zeros(1, device=device)
        (pg.send([flag], 1, 0) if rank == 0 else pg.recv([flag], 0, 0)).wait()  # both start together
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for a in range(0, nbytes, chunk):
            part = buf[a : a + chunk]
            (pg.send([part], 1, 0) if rank == 0 else pg.recv([part], 0, 0)).wait()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()
    times = [once() for _ in range(runs)]
    if rank == 1:
        out.put({"setup_s": setup, "median_s": statistics.median(times), "times": times})


def measure(nbytes: int, chunk: int, runs: int, port: int = 0) -> dict[str, Any]:
    """Run both ranks in fresh processes; the receiver's timings."""
    import socket

    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, nbytes, chunk, runs, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    result = out.get(timeout=600)
    for p in procs:
        p.join()
    return dict(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--chunk-mib", type=int, default=0, help="send in slices of this size (0: one send)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    nbytes = int(args.gib * 2**30)
    chunk = args.chunk_mib << 20 if args.chunk_mib else nbytes
    result = measure(nbytes, chunk, args.runs)
    gbps = nbytes / result["median_s"] / 1e9
    print(
        f"bare NCCL send/recv cuda:0 -> cuda:1, {nbytes / 2**30:.2f} GiB in "
        f"{'one send' if chunk == nbytes else f'{chunk >> 20} MiB slices'}: median {result['median_s'] * 1e3:.1f} ms "
        f"= {gbps:.1f} GB/s (group setup {result['setup_s']:.2f} s)"
    )
    print(json.dumps({"nbytes": nbytes, "chunk": chunk, "gbps": gbps, **result}))


if __name__ == "__main__":
    main()
