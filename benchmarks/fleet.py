"""Streaming fan-out on real daemons: one seed, N pullers at once, seed egress and wall time.

    python benchmarks/fleet.py                                   # loopback, TCP engine, N = 1, 2, 4, 8
    python benchmarks/fleet.py --nodes 1,2,4,8 --mib 128 --chunk 4MiB --json fleet.json
    python benchmarks/fleet_sim.py --validate fleet.json         # the model of the same runs
    python benchmarks/fleet.py --protocol nccl --device cuda:0 --to cuda:1 --gib 8   # 2 GPUs, NCCL
    python benchmarks/fleet.py --protocol nvlink_intra --device cuda:0 --to cuda:1 --gib 8  # same, engine

A seed daemon holds a set of random bf16 tensors; N other daemons replicate it at once
(`sdk.replicate(name, to=[...])`, one streamed fan-out). For each N: the time until every node
holds a complete, checked replica (the fan-out's reply), the bytes the seed served (its own
`status()["egress"]`) over the set size, and the same for the busiest relay. Medians of --runs.
The "before" row is what pulling whole copies from the seed costs: N copies by construction.

Calibration for the simulator (written to --json), from runs in which the policy has nothing to
choose: 1, 2 and 4 one-to-one pulls of distinct sets at once (2, 4, 8 daemons moving bytes;
one of them is the fan-out to one node) give what the machine moves in all with that many
daemons busy (they share its two cores: the
model's fabric, a function of the busy daemons); the RPC round trip and the pull's phases
(setup, fingerprint check, promotion) are measured directly.

With `--protocol nccl` (two GPUs): node A holds the set on --device, node B replicates it onto
--to over an NCCL pair group (no Transfer Engine); the group is made by a small warm-up pull, so
the timed runs measure the kept group. Compared in the same run with a bare NCCL send/recv of
the same bytes between two processes (benchmarks/nccl_baseline.py), in one send and in
chunk-sized sends. With `--protocol nvlink_intra` (or any engine protocol) and a GPU --device:
the same pull, its chunks read through the Transfer Engine, against the same bare NCCL limit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from _common import REPO, random_set

import sdk
from tests.daemons import DaemonProcess
from tests.etcd_server import free_port, start_etcd

TOKEN = "bench"


def _config(etcd: Any, protocol: str, chunk: str, advertise: float, huge: bool = True, extra: str = "") -> str:
    return (
        f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\ntoken = "{TOKEN}"\nlog_level = "warning"\n'
        f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = 2\n'
        f'[transport]\nprotocol = "{protocol}"\n'
        f"[memory]\nhuge_pages = {str(huge).lower()}\n"
        f'[fleet]\nchunk_bytes = "{chunk}"\nadvertise_seconds = {advertise}\n{extra}'
    )


def _shapes(nbytes: int) -> dict[str, tuple[int, ...]]:
    """bf16 tensors of a few MiB each, odd sizes (they straddle chunk boundaries)."""
    out, left, i = {}, nbytes, 0
    while left > 0:
        n = min(left // 2, (3 << 20) // 2 + 997 * (i % 7))
        out[f"layer{i}.weight"] = (max(n, 1),)
        left -= 2 * max(n, 1)
        i += 1
    return out


def _egress(d: DaemonProcess) -> int:
    with d.client() as c:
        return int(c.status()["egress"]["chunks"])


def fan_out(
    seed: DaemonProcess, pullers: list[DaemonProcess], name: str, src: dict[str, torch.Tensor], chunk: int
) -> dict:
    everyone = [seed, *pullers]
    with seed.client() as c:
        c.put(name, src)
        nbytes = int(c.info(name)["slab_bytes"])
        before = {d.node: _egress(d) for d in everyone}
        t0 = time.perf_counter()
        r = c.replicate(name, to=[d.node for d in pullers], chunk=chunk)
        seconds = time.perf_counter() - t0
        served = {d.node: _egress(d) - before[d.node] for d in everyone}
        c.delete(name)
    return {
        "seconds": seconds,
        "seed_egress": served[seed.node] / nbytes,
        "max_relay_egress": max((served[d.node] for d in pullers), default=0) / nbytes,
        "nbytes": nbytes,
        "nodes": r["nodes"],
    }


def raw_rate(a: DaemonProcess, b: DaemonProcess, mib: int = 64) -> float:
    """Bytes/s of one engine read of `mib` MiB between two daemons' hosts, without the daemon:
    this process's own engine reads from a fresh holder process (benchmarks/_te_holder.py)."""
    import numpy as np
    from _te_holder import Holder

    from tensord_dataplane.transport.base import Batch
    from tensord_dataplane.transport.mooncake import MooncakeTransport

    size = mib << 20
    with Holder(size) as h, MooncakeTransport("127.0.0.1", "tcp") as t:
        buf = torch.empty(size, dtype=torch.uint8)
        t.register(buf.data_ptr(), size)
        one = Batch(np.array([buf.data_ptr()]), np.array([h.address]), np.array([size]))
        t.read(h.session, one)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            t.read(h.session, one)
            times.append(time.perf_counter() - t0)
    return size / statistics.median(times)


def pairs_at_once(daemons: list[DaemonProcess], src: dict[str, torch.Tensor], chunk: int, run: int) -> float:
    """Seconds for len/2 one-to-one pulls of distinct sets at once (daemon 2i -> 2i+1): what
    this machine moves through the daemons when the policy has nothing to choose."""
    pairs = [(daemons[i], daemons[i + 1]) for i in range(0, len(daemons) - 1, 2)]
    for i, (a, _) in enumerate(pairs):
        with a.client() as c:
            c.put(f"bench/pair{i}-{run}", src)

    def one(i: int) -> None:
        a, b = pairs[i]
        with a.client() as c:
            c.replicate(f"bench/pair{i}-{run}", to=[b.node], chunk=chunk)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(pairs)) as pool:
        list(pool.map(one, range(len(pairs))))
    seconds = time.perf_counter() - t0
    for i, (a, _) in enumerate(pairs):
        with a.client() as c:
            c.delete(f"bench/pair{i}-{run}")
    return seconds


def gpu_pair(args: argparse.Namespace) -> None:
    import nccl_baseline

    work = Path(tempfile.mkdtemp(prefix="tensord-fleet-gpu-"))
    (work / "etcd").mkdir()
    etcd = start_etcd(work / "etcd")
    chunk = args.chunk if args.chunk != "4MiB" else "auto"
    daemons = []
    try:
        for n in ("a", "b"):
            cfg = _config(etcd, args.protocol, chunk, 0.5, extra="".join(f"{kv}\n" for kv in args.fleet))
            daemons.append(DaemonProcess(work, n, cfg, env={"TENSORD_LOG_LEVEL": "warning"}).start(120))
        a, b = daemons
        src = random_set(_shapes(int(args.gib * 2**30)), args.device)
        small = random_set(_shapes(64 << 20), args.device)
        with a.client() as ca, b.client() as cb:
            ca.put("bench/warm", small, device=args.device)
            t0 = time.perf_counter()
            cb.replicate("bench/warm", device=args.to)
            warm = time.perf_counter() - t0
            setup = (cb.status()["pairs"] or {}).get("setup_s")
            walls, fetches, phases = [], [], []
            for i in range(args.runs + 1):
                version = ca.put("bench/gpu", src, device=args.device)
                t0 = time.perf_counter()
                r = cb.replicate("bench/gpu", version, to=["b"], device=args.to)
                wall = time.perf_counter() - t0
                if i:  # the first is a warm-up (slab blocks, kernels)
                    walls.append(wall)
                    fetches.append(r["nodes"]["b"]["phases"]["fetch"])
                    phases.append(r["nodes"]["b"]["phases"])
                ca.delete("bench/gpu", version)
            nbytes = sum(t.numel() * t.element_size() for t in src.values())
            used_chunk = int(r["nodes"]["b"].get("chunk") or 0)
        del src, small
    finally:
        for d in daemons:
            d.kill()
        etcd.stop(kill=True)
        etcd.cleanup()
    wall, fetch = statistics.median(walls), statistics.median(fetches)
    if args.protocol == "nccl":
        path = "NCCL pair group" if args.device.startswith("cuda") else "gloo pair group"
    else:
        path = f"Transfer Engine ({args.protocol}) reads"
    print(f"{path} {args.device} -> {args.to}, {nbytes / 2**30:.2f} GiB, chunks {chunk}")
    print(f"  first pull (warm-up, 64 MiB): {warm:.2f} s; pair-group setup: {setup} s")
    print(f"  tensord replicate: {wall * 1e3:.1f} ms = {nbytes / wall / 1e9:.1f} GB/s")
    print(f"  of which the fetch phase (moving the chunks): {fetch * 1e3:.1f} ms")
    names = sorted({k for p in phases for k in p})
    print(
        "  pull phases (medians): "
        + ", ".join(f"{k} {statistics.median(p.get(k, 0) for p in phases) * 1e3:.1f} ms" for k in names)
    )
    if not torch.cuda.is_available():
        print("  no GPU here: no bare NCCL baseline")
        return
    torch.cuda.empty_cache()
    one = nccl_baseline.measure(nbytes, nbytes, args.runs)
    sliced = nccl_baseline.measure(nbytes, used_chunk or nbytes, args.runs)
    print(
        f"  bare NCCL send/recv, one send: {one['median_s'] * 1e3:.1f} ms = {nbytes / one['median_s'] / 1e9:.1f} GB/s"
    )
    print(f"  bare NCCL send/recv, sends of {used_chunk >> 20} MiB: {sliced['median_s'] * 1e3:.1f} ms")
    print(f"  ratio (bare one send / tensord replicate): {one['median_s'] / wall:.2f}x  (target >= 0.85x)")
    print(f"  ratio (bare one send / tensord fetch phase): {one['median_s'] / fetch:.2f}x")


def rtt(d: DaemonProcess, rounds: int = 50) -> float:
    with sdk.Client(address=f"127.0.0.1:{d.config_port}", token=TOKEN) as c:  # type: ignore[attr-defined]
        c.status()
        t0 = time.perf_counter()
        for _ in range(rounds):
            c.status()
        return (time.perf_counter() - t0) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2,4,8", help="pullers per fan-out")
    ap.add_argument("--mib", type=int, default=128, help="set size")
    ap.add_argument("--chunk", default="4MiB")
    ap.add_argument("--protocol", default="tcp")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument(
        "--huge-pages",
        action="store_true",
        help="host slabs in huge pages (off by default here: on a shared VM the kernel's compaction "
        "for fresh huge pages stalls runs at random)",
    )
    ap.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "fleet.json")
    ap.add_argument("--device", default="cpu", help="nccl mode: where node A holds the set")
    ap.add_argument("--to", default="cpu", help="nccl mode: where node B's copy lives")
    ap.add_argument("--gib", type=float, default=8.0, help="nccl mode: set size")
    ap.add_argument("--fleet", action="append", default=[], help="nccl mode: a [fleet] setting, e.g. batch=8")
    args = ap.parse_args()
    if args.protocol == "nccl" or args.device != "cpu":
        gpu_pair(args)
        return
    counts = [int(x) for x in args.nodes.split(",")]
    chunk_bytes = int(args.chunk[:-3]) << {"KiB": 10, "MiB": 20, "GiB": 30}[args.chunk[-3:]]
    work = Path(tempfile.mkdtemp(prefix="tensord-fleet-"))
    (work / "etcd").mkdir()
    etcd = start_etcd(work / "etcd")
    daemons: list[DaemonProcess] = []
    try:
        names = ["seed", *(f"p{i}" for i in range(max(counts)))]
        for n in names:
            cfg = _config(etcd, args.protocol, args.chunk, 0.1, args.huge_pages)
            d = DaemonProcess(work, n, cfg, env={"TENSORD_LOG_LEVEL": "warning"})
            d.config_port = int(cfg.split('listen = "127.0.0.1:')[1].split('"')[0])  # type: ignore[attr-defined]
            daemons.append(d)
        with ThreadPoolExecutor(len(daemons)) as pool:
            list(pool.map(lambda d: d.start(120), daemons))
        seed, pullers = daemons[0], daemons[1:]
        src = random_set(_shapes(args.mib << 20), "cpu")
        print(
            f"{platform.node()}: {len(src)} tensors, {args.mib} MiB, chunks of {args.chunk}, "
            f"{args.protocol} on loopback, {len(daemons)} daemons on one machine of "
            f"{os.cpu_count()} cores; medians of {args.runs} runs"
        )
        fan_out(seed, pullers[:1], "bench/warm", src, chunk_bytes)  # engines connected, pages touched
        # Calibration runs (one-to-one pulls: the policy has nothing to choose) and fan-outs are
        # interleaved, round after round, so that other work on the machine weighs on both alike.
        half_rtt = rtt(seed) / 2
        pair_counts = [k for k in (2, 4) if 2 * k <= len(pullers)]  # one pair: the fan-out to one
        pair_times: dict[int, list[float]] = {k: [] for k in pair_counts}
        fans: dict[int, list[dict]] = {n: [] for n in counts}
        for i in range(args.runs):
            for k in pair_counts:
                pair_times[k].append(pairs_at_once(pullers[: 2 * k], src, chunk_bytes, i))
            for n in counts:
                fans[n].append(fan_out(seed, pullers[:n], f"bench/n{n}-{i}", src, chunk_bytes))
        solo = fans[1] if 1 in fans else [fan_out(seed, pullers[:1], "bench/solo", src, chunk_bytes)]
        nbytes = solo[0]["nbytes"]
        phases = [r["nodes"][pullers[0].node]["phases"] for r in solo]
        setup = statistics.median(p["setup"] for p in phases) + statistics.median(
            r["seconds"] - r["nodes"][pullers[0].node]["seconds"] for r in solo
        )
        finish = statistics.median(p["check"] + p["promote"] for p in phases)
        curve = [(2, nbytes / max(statistics.median(r["seconds"] for r in solo) - setup - finish, 1e-6))]
        for k in pair_counts:
            busy = statistics.median(pair_times[k]) - setup - finish
            curve.append((2 * k, k * nbytes / max(busy, 1e-6)))
        calibration = {
            "bandwidth": raw_rate(seed, pullers[0]),
            "fabric": curve[-1][1],
            "fabric_curve": curve,
            "pair_seconds": {1: statistics.median(r["seconds"] for r in solo)}
            | {k: statistics.median(v) for k, v in pair_times.items()},
            "latency": half_rtt,
            "setup": setup,
            "finish": finish,
        }
        print(
            f"calibration: a raw engine read {calibration['bandwidth'] / 1e9:.2f} GB/s; one-to-one pulls at once: "
            + ", ".join(f"{n} daemons busy {g / 1e9:.2f} GB/s in all" for n, g in curve)
            + f"; RPC {2 * half_rtt * 1e3:.2f} ms round trip; setup {setup:.3f} s, check + promote {finish:.3f} s"
        )
        runs = []
        print(f"{'N':>3} {'all ready s':>12} {'seed egress':>12} {'max relay':>10} {'before (whole copies)':>22}")
        for n in counts:
            res = fans[n]
            row = {
                "nodes": n,
                "size": nbytes,
                "chunk": chunk_bytes,
                "batch": 2,
                "window": 8,
                "slots": 8,
                "refresh": 0.4,
                "seconds": statistics.median(r["seconds"] for r in res),
                "seed_egress": statistics.median(r["seed_egress"] for r in res),
                "max_relay_egress": statistics.median(r["max_relay_egress"] for r in res),
                "all": [r["seconds"] for r in res],
                "spread": [min(r["seconds"] for r in res), max(r["seconds"] for r in res)],
            }
            runs.append(row)
            print(
                f"{n:>3} {row['seconds']:>12.3f} {row['seed_egress']:>11.2f}x {row['max_relay_egress']:>9.2f}x "
                f"{'seed egress ' + str(n) + '.00x':>22}"
            )
        machine = f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}"
        args.json.write_text(json.dumps({"machine": machine, "calibration": calibration, "runs": runs}, indent=2))
        print(f"wrote {args.json}")
    finally:
        for d in daemons:
            d.kill()
        etcd.stop(kill=True)
        etcd.cleanup()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
