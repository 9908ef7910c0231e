"""A publication read from another node against a raw Transfer Engine read of the same bytes.

    python benchmarks/publish_remote.py                       # CPU: host tensors, TCP on loopback
    python benchmarks/publish_remote.py --protocol nvlink_intra --device cuda:0 --to cuda:0 \\
        --tensors 90000 --gib 20

Two daemons (nodes A and B) on this host. A publisher process publishes a DeepSeek-like set
(each tensor its own allocation, the dict in shuffled order, fp8 / fp32 / bf16) to node A,
without a copy: it registers its allocations with its own Transfer Engine. This process, a
client of node B, reads it one-sided from the publisher's memory. Limits measured in the same
run: a raw engine read of exactly the same pieces (one entry per tensor, into registered memory,
as tensord's get issues them) and a raw one-entry read of as many bytes from a daemon slab.
The publisher prints `torch.cuda.mem_get_info` before and after publishing (and node A's held
bytes): a publication adds no copy. Publish times: the first, and again of the same memory.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import REPO, deepseek_shapes, median_seconds, random_tensors, row, sync

import sdk
from tensord_dataplane.cuda import current
from tensord_dataplane.remote import _range as memory_range
from tensord_dataplane.transport.base import Batch
from tests.daemons import DaemonProcess, child_env
from tests.etcd_server import free_port, start_etcd

NAME = "bench/published"


def build(tensors: int, gib: float, device: str) -> dict[str, torch.Tensor]:
    src = random_tensors(deepseek_shapes(tensors, int(gib * 2**30)), device)
    keys = list(src)
    order = np.random.default_rng(0).permutation(len(keys))
    return {keys[i]: src[keys[i]] for i in order}


def free_bytes(device: str) -> int:
    return torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else 0


def publisher(socket: str, tensors: int, gib: float, device: str, runs: int) -> None:
    """The publishing process: publish, time re-publishing, keep the last until told to stop."""
    src = build(tensors, gib, device)
    sync()
    with sdk.Client(socket) as c:
        before = free_bytes(device)
        t0 = time.perf_counter()
        pub = c.publish(NAME, src)
        sync()
        first = time.perf_counter() - t0
        print(f"  publisher: first publish of {len(src)} tensors {first:.3f} s", file=sys.stderr, flush=True)
        after = free_bytes(device)
        held = c.status()["devices"].get(device, {})
        pub.unpublish()
        again, withdraw = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            pub = c.publish(NAME, src)
            again.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pub.unpublish()
            withdraw.append(time.perf_counter() - t0)
        pub = c.publish(NAME, src)
        out = {
            "version": pub.version,
            "count": len(src),
            "nbytes": sum(t.nbytes for t in src.values()),
            "first": first,
            "again": statistics.median(again),
            "unpublish": statistics.median(withdraw),
            "free_before": before,
            "free_after": after,
            "daemon_used": held.get("used", 0),
            "daemon_published": held.get("published", 0),
        }
        print(json.dumps(out), flush=True)
        sys.stdin.readline()  # until the reader is done
        pub.unpublish()


@contextlib.contextmanager
def pieces(cb: sdk.Client, to: str) -> Iterator[tuple[Any, Callable[[int], list[tuple[str, Batch]]], np.ndarray]]:
    """The reader's engine, the engine batches of the publication's first k pieces (one entry
    per tensor, as a raw reader issues them) into registered memory on `to`, and the pieces'
    lengths."""
    engine = cb._transport()
    pin, manifest, slab = cb._open(NAME, None)
    try:
        sources = slab._sources  # type: ignore[attr-defined]
        lengths = sources.ends - sources.starts
        dst = torch.empty(manifest.nbytes, dtype=torch.uint8, device=to)
        base, length, _ = memory_range(dst)
        with current(to):
            engine.register(base, length)
        try:
            yield (
                engine,
                lambda k: slab.batches(dst.data_ptr() + sources.starts[:k], sources.src[:k], lengths[:k]),
                lengths,
            )  # type: ignore[attr-defined]
        finally:
            with current(to):
                engine.unregister(base)
    finally:
        slab.close()
        cb._release(pin)


def raw_reads(cb: sdk.Client, to: str, runs: int) -> tuple[float, int]:
    """A raw engine read of all the publication's pieces, one entry each, and the byte count."""
    with pieces(cb, to) as (engine, batches_of, lengths):
        batches = batches_of(len(lengths))
        return median_seconds(lambda: [engine.read(s, b) for s, b in batches], runs), int(lengths.sum())


def probe_entries(cb: sdk.Client, to: str, limit_s: float) -> float:
    """The engine's cost per entry: raw reads of the publication's first K pieces (one entry
    each), the first read of each K (the engine maps allocations it has not seen) and again;
    the time all pieces would take at the last K's rate."""
    with pieces(cb, to) as (engine, batches_of, lengths):
        k, per = 256, 0.0
        while k <= len(lengths):
            batches = batches_of(k)
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                for s, b in batches:
                    engine.read(s, b)
                times.append(time.perf_counter() - t0)
            n = sum(len(b) for _, b in batches)
            print(
                f"  probe: {n} entries ({int(lengths[:k].sum())} bytes): first {times[0] * 1e3:.1f} ms, "
                f"again {times[1] * 1e3:.1f} ms ({times[1] / n * 1e6:.1f} us an entry)",
                flush=True,
            )
            per = times[1] / n
            if max(times) * 4 > limit_s:
                break
            k *= 4
        return per * len(lengths)


def release_memory() -> None:
    """Give cached GPU memory back (the set is ~20 GB: a few copies at once fill an H200)."""
    sync()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def raw_flat(ca: sdk.Client, cb: sdk.Client, nbytes: int, device: str, to: str, runs: int) -> float:
    """A raw one-entry engine read of `nbytes` from a daemon slab on node A."""
    ca.put("bench/flat", {"flat": torch.zeros(nbytes, dtype=torch.uint8, device=device)}, device=device)
    release_memory()
    engine = cb._transport()
    pin, _, slab = cb._open("bench/flat", None)
    try:
        dst = torch.empty(nbytes, dtype=torch.uint8, device=to)
        base, length, _ = memory_range(dst)
        one = Batch(np.array([dst.data_ptr()]), np.array([slab.address]), np.array([nbytes]))  # type: ignore[attr-defined]
        with current(to):
            engine.register(base, length)
        try:
            return median_seconds(lambda: engine.read(slab.session, one), runs)  # type: ignore[attr-defined]
        finally:
            with current(to):
                engine.unregister(base)
    finally:
        slab.close()
        cb._release(pin)
        ca.delete("bench/flat")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--protocol", default="tcp")
    p.add_argument("--device", default="cpu", help="where the publisher's tensors live")
    p.add_argument("--to", default="cpu", help="where the reader's copy lands")
    p.add_argument("--tensors", type=int, default=2000)
    p.add_argument("--gib", type=float, default=0.1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--stacks-after", type=float, default=0, help="dump every thread's stack after this many seconds")
    p.add_argument("--probe", type=float, default=0, help="time raw reads of the first K pieces, up to ~this many s")
    p.add_argument("--probe-only", action="store_true", help="stop after the probe")
    p.add_argument("--publisher", default="", help=argparse.SUPPRESS)  # internal: the publishing process
    args = p.parse_args()
    if args.stacks_after:  # a run that outlives its time limit says where each process was
        faulthandler.dump_traceback_later(args.stacks_after, exit=False)
    if args.publisher:
        publisher(args.publisher, args.tensors, args.gib, args.device, args.runs)
        return
    etcd = start_etcd(Path(tempfile.mkdtemp(prefix="tensord-etcd-")))
    work = Path(tempfile.mkdtemp(prefix="tensord-pubremote-"))
    daemons: list[DaemonProcess] = []
    proc = None
    try:
        for node in ("a", "b"):
            config = (
                f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\nlog_level = "warning"\n'
                f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\n[transport]\nprotocol = "{args.protocol}"\n'
            )
            daemons.append(DaemonProcess(work, node, config, env={"TENSORD_LOG_LEVEL": "warning"}).start())
        a, b = daemons
        cmd = [sys.executable, __file__, "--publisher", a.socket, "--device", args.device]
        cmd += ["--tensors", str(args.tensors), "--gib", str(args.gib), "--runs", str(args.runs)]
        cmd += ["--stacks-after", str(args.stacks_after)]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        proc = subprocess.Popen(cmd, **pipes, text=True, env=child_env(), cwd=REPO)  # type: ignore[call-overload]
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit("the publisher failed (see its stderr above)")
        pub = json.loads(line)
        nbytes = pub["nbytes"]
        print(
            f"{pub['count']} DeepSeek-like tensors, {nbytes / 2**30:.2f} GiB published on node A ({args.device}) "
            f"by another process, read by a client of node B into {args.to} over {args.protocol}; "
            "ratio = limit / tensord; rows printed as measured",
            flush=True,
        )
        with a.client() as ca, b.client() as cb:
            t0 = time.perf_counter()
            cb.get(NAME, names=["model.norm.weight"], device=args.to)  # start the client's engine
            print(f"  first get of one tensor (engine start, handshakes): {time.perf_counter() - t0:.3f} s", flush=True)
            projected = probe_entries(cb, args.to, args.probe) if args.probe else 0.0
            if args.probe_only:
                return
            flat = raw_flat(ca, cb, nbytes, args.device, args.to, args.runs)  # first: its memory goes after
            print(row("raw engine read, one entry from a daemon slab", nbytes, flat), flush=True)
            release_memory()
            if projected > args.probe > 0:
                print(f"  raw read of the pieces skipped: about {projected:.1f} s projected by the probe", flush=True)
                raw, vs = flat, "one entry"
            else:
                vs = "pieces"
                raw, raw_bytes = raw_reads(cb, args.to, args.runs)
                assert raw_bytes == nbytes, (raw_bytes, nbytes)
                print(row("raw engine read of the same pieces (one entry each)", nbytes, raw), flush=True)
            get = median_seconds(lambda: cb.get(NAME, device=args.to), args.runs)
            print(row(f"tensord get, fingerprints checked (vs {vs})", nbytes, get, raw), flush=True)
            print(row("tensord get, fingerprints checked (vs one entry)", nbytes, get, flat), flush=True)
            get_unchecked = median_seconds(lambda: cb.get(NAME, device=args.to, verify=False), args.runs)
            print(row(f"tensord get, verify=False (vs {vs})", nbytes, get_unchecked, raw), flush=True)
            targets = {k: torch.empty_like(t) for k, t in cb.get(NAME, device=args.to).items()}
            release_memory()
            load = median_seconds(lambda: cb.load_into(targets, NAME), args.runs)
            print(row(f"tensord load_into, checked (vs {vs})", nbytes, load, raw), flush=True)
            load_unchecked = median_seconds(lambda: cb.load_into(targets, NAME, verify=False), args.runs)
            print(row(f"tensord load_into, verify=False (vs {vs})", nbytes, load_unchecked, raw), flush=True)
        added = pub["free_before"] - pub["free_after"]
        print(
            f"  publisher: first publish {pub['first'] * 1e3:.1f} ms, publish again (same memory) "
            f"{pub['again'] * 1e3:.1f} ms, unpublish {pub['unpublish'] * 1e3:.1f} ms"
        )
        if args.device.startswith("cuda"):
            print(
                f"  {args.device} free memory before / after the first publish: {pub['free_before']} / "
                f"{pub['free_after']} bytes ({added} added, engine start included)"
            )
        print(f"  node A holds {pub['daemon_used']} bytes on {args.device}; published there: {pub['daemon_published']}")
    finally:
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=60)
        for d in daemons:
            d.kill()
        etcd.stop(kill=True)
        etcd.cleanup()
    sync()


if __name__ == "__main__":
    main()
