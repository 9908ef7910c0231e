"""Soak: a daemon under a mixed load from several processes for a given time; nothing may grow.

    python benchmarks/soak.py --minutes 15 --workers 4

Each worker process loops over a random mix of put, get (checked bit for bit), mount (checked),
delete, watch (a connection of its own each time), info/ls and client reconnects, on names of
its own, with a daemon that keeps the 4 newest versions of each name (retention) and a state
directory. Every --sample seconds the parent prints the daemon's RSS, open descriptors, held
versions, pins, open reservations and host bytes, the operations per second and the latency
percentiles of the interval; at the end, how each of them moved between the first sample after
warm-up and the last (with a least-squares slope per 10 minutes), and the error counts. Any
wrong byte or unexpected error is counted and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from _common import REPO

import sdk
from tests.daemons import DaemonProcess, child_env

RETENTION = 4
NAMES_PER_WORKER = 6
DTYPES = (torch.float32, torch.bfloat16, torch.int8)


# -- a worker ---------------------------------------------------------------------------------


def make_set(seed: int) -> dict[str, torch.Tensor]:
    """The tensors of one version, all from `seed`: regenerated to check what comes back."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(rng.randrange(1, 33)):
        numel = rng.randrange(1, 1 << 17)
        dtype = rng.choice(DTYPES)
        t = torch.randn(numel, generator=g) * 50
        out[f"t{i}"] = t.to(dtype)
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def worker(index: int, workers: int, socket: str, seconds: float, sample: float) -> None:
    rng = random.Random(1000 + index)
    names = [f"soak/w{index}/s{k}" for k in range(NAMES_PER_WORKER)]
    neighbour, seen = f"soak/w{(index + 1) % workers}/s0", 0  # watched: another worker writes it
    latest: dict[str, tuple[int, int]] = {}  # name -> (version, seed) of our last put
    lat: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    client = sdk.Client(socket)
    start = last_report = time.monotonic()

    @contextlib.contextmanager
    def timed(op: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            lat.setdefault(op, []).append((time.perf_counter() - t0) * 1e3)

    def count(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    while time.monotonic() - start < seconds:
        name = rng.choice(names)
        op = rng.choices(["put", "get", "mount", "delete", "watch", "info", "reconnect"], [25, 30, 20, 4, 3, 15, 1])[0]
        if op in ("get", "mount") and name not in latest:
            op = "put"
        c = client  # the client of this round (a reconnect replaces it)
        try:
            if op == "put":
                seed = rng.randrange(2**31)
                tensors = make_set(seed)
                with timed(op):
                    version = c.put(name, tensors)
                latest[name] = (version, seed)
            elif op == "get":
                version, seed = latest[name]
                with timed(op):
                    got = c.get(name, version)
                if not same(got, make_set(seed)):
                    count("wrong_bytes")
            elif op == "mount":  # timed: open, map, views, release; checked after (host views stay)
                version, seed = latest[name]
                with timed(op), c.mount(name, version) as m:
                    mounted, views = m.version, dict(m.tensors)
                if mounted != version or not same(views, make_set(seed)):
                    count("wrong_bytes")
            elif op == "delete":
                with timed(op):
                    c.delete(name)
                latest.pop(name, None)
            elif op == "watch":  # a long poll of 0.2 s on a connection of its own
                with timed(op):
                    got = list(c.watch(neighbour, after=seen, timeout=0.2))
                seen = max([seen, *got])
            elif op == "info":
                with timed(op):
                    c.ls("soak/")
            elif op == "reconnect":
                client.close()
                client = sdk.Client(socket)
            count(op)
        except sdk.TensordError as exc:  # none expected: each name has one writer, retention keeps its latest
            count(f"error:{type(exc).__name__}")
        if time.monotonic() - last_report >= sample:
            last_report = time.monotonic()
            print(json.dumps({"lat": lat, "counts": counts}), flush=True)
            lat, counts = {}, {}
    print(json.dumps({"lat": lat, "counts": counts, "done": True}), flush=True)
    client.close()


# -- the parent -------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def slope_per_10min(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 600


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--sample", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline sample")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--socket", help=argparse.SUPPRESS)
    args = p.parse_args()
    seconds = args.minutes * 60
    if args.worker is not None:
        worker(args.worker, args.workers, args.socket, seconds, args.sample)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="tensord-soak-"))
    config = f'[daemon]\nstate_dir = "{workdir / "state"}"\nlog_level = "info"\n[memory]\nretention = {RETENTION}\n'
    daemon = DaemonProcess(workdir, "soak", config=config, env={"TENSORD_LOG_LEVEL": "info"}).start()
    print(
        f"soak: {args.workers} worker processes for {args.minutes:g} min, a sample every {args.sample:g} s; "
        f"daemon pid {daemon.pid}, {os.cpu_count()} cores, log {daemon.log}"
    )
    reports: queue.Queue[dict[str, Any]] = queue.Queue()
    procs = []
    for i in range(args.workers):
        cmd = [sys.executable, __file__, "--worker", str(i), "--socket", daemon.socket]
        cmd += ["--minutes", str(args.minutes), "--sample", str(args.sample), "--workers", str(args.workers)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=REPO)
        procs.append(proc)

        def pump(proc: subprocess.Popen[str] = proc) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                reports.put(json.loads(line))

        threading.Thread(target=pump, daemon=True).start()

    header = (
        f"{'t s':>6} {'RSS MiB':>8} {'fds':>5} {'vers':>5} {'pins':>5} {'resv':>5} {'host MiB':>9} {'ops/s':>7}  "
        f"{'get p50/p99':>13} {'put p50/p99':>13} {'mount p50/p99':>14} {'watch p99':>9}"
    )
    print(header)
    keys = ("rss", "fds", "spare_fds", "versions", "pins", "host")
    series: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    totals: dict[str, int] = {}
    all_lat: dict[str, list[float]] = {}
    t0 = time.monotonic()
    with daemon.client() as c:
        next_sample = t0 + args.sample
        while any(proc.poll() is None for proc in procs) or not reports.empty():
            time.sleep(max(0.0, next_sample - time.monotonic()))
            next_sample += args.sample
            lat: dict[str, list[float]] = {}
            while True:
                try:
                    r = reports.get_nowait()
                except queue.Empty:
                    break
                for op, values in r["lat"].items():
                    lat.setdefault(op, []).extend(values)
                    all_lat.setdefault(op, []).extend(values)
                for k, v in r["counts"].items():
                    totals[k] = totals.get(k, 0) + v
            t = time.monotonic() - t0
            st = c.status()
            row = {
                "rss": rss_mib(daemon.pid),
                "fds": float(daemon.open_fds()),
                "versions": float(st["versions"]),
                "pins": float(st["pins"]),
                "host": st["devices"]["cpu"]["used"] / 2**20,
            }
            row["spare_fds"] = row["fds"] - row["versions"]  # beyond one per held version: connections, ...
            for k, v in row.items():
                series[k].append((t, v))
            ops = sum(len(v) for v in lat.values()) / args.sample

            def pq(op: str, lat: dict[str, list[float]] = lat) -> str:
                return f"{percentile(lat.get(op, []), 0.5):6.1f}/{percentile(lat.get(op, []), 0.99):6.1f}"

            print(
                f"{t:6.0f} {row['rss']:8.1f} {row['fds']:5.0f} {row['versions']:5.0f} {row['pins']:5.0f} "
                f"{st['reservations']:5d} {row['host']:9.1f} {ops:7.1f}  {pq('get'):>13} {pq('put'):>13} "
                f"{pq('mount'):>14} {percentile(lat.get('watch', []), 0.99):9.1f}",
                flush=True,
            )
            if t > seconds + 120:
                print("workers did not finish in time")
                break
    codes = [proc.wait(60) for proc in procs]
    daemon_alive = daemon.proc is not None and daemon.proc.poll() is None
    with daemon.client() as c:
        end = c.status()
    daemon.stop()

    print(f"\nsummary over {args.minutes:g} min (baseline: the first sample after {args.warmup:g} s):")
    for key, unit in (("rss", "MiB"), ("fds", ""), ("spare_fds", ""), ("versions", ""), ("pins", ""), ("host", "MiB")):
        points = [(t, v) for t, v in series[key] if t >= args.warmup] or series[key]
        values = [v for _, v in points]
        half = points[len(points) // 2 :]
        print(
            f"  {key:>9}: baseline {values[0]:.1f}, end {values[-1]:.1f}, min {min(values):.1f}, "
            f"max {max(values):.1f} {unit}; slope {slope_per_10min(points):+.2f} per 10 min "
            f"({slope_per_10min(half):+.2f} over the second half)"
        )
    for op in ("put", "get", "mount", "delete", "watch", "info"):
        values = all_lat.get(op, [])
        print(
            f"  {op:>9}: {len(values)} ops, p50 {percentile(values, 0.5):.2f} ms, "
            f"p99 {percentile(values, 0.99):.2f} ms, max {max(values, default=float('nan')):.1f} ms"
        )
    print(f"  counts: {dict(sorted(totals.items()))}")
    print(f"  after the workers: {end['pins']} pins, {end['reservations']} reservations; worker exit codes {codes}")
    bad = {k: v for k, v in totals.items() if k.startswith("error") or k == "wrong_bytes"}
    ok = daemon_alive and not bad and codes == [0] * len(codes) and end["pins"] == 0 and end["reservations"] == 0
    print("  result:", "OK" if ok else f"FAILED {bad}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
