"""Remote get through the Transfer Engine against the engine alone, same bytes, same run.

    python benchmarks/cluster.py                                  # CPU: TCP on loopback
    python benchmarks/cluster.py --protocol nvlink_intra --device cuda:0 --to cuda:1 --gib 16
    python benchmarks/cluster.py --protocol nvlink_intra --device cuda:0 --to cuda:1 --tensors 90000 --gib 16.5

Node A holds the set (slab on --device); the client talks to node B's socket, so every byte
comes from A one-sided through the client's own engine. Limits measured in the same run:
a raw engine read of A's slab into pre-registered memory (one entry), and on GPUs a peer copy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import REPO, deepseek_shapes, llm_shapes, median_seconds, profile, random_set, random_tensors, row, sync

from tensord_dataplane.cuda import current
from tensord_dataplane.remote import _range as memory_range
from tensord_dataplane.remote import window_for
from tensord_dataplane.transport.base import Batch
from tests.daemons import DaemonProcess
from tests.etcd_server import free_port, start_etcd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--protocol", default="tcp")
    p.add_argument("--device", default="cpu", help="where node A's slab lives")
    p.add_argument("--to", default="cpu", help="where the client's copy lands")
    p.add_argument("--gib", type=float, default=0.25)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument(
        "--tensors", type=int, default=0, help="a DeepSeek-like set of this many tensors (default: LLM-shaped)"
    )
    p.add_argument("--profile", action="store_true", help="also profile one load_into and one get")
    args = p.parse_args()
    etcd = start_etcd(Path(tempfile.mkdtemp(prefix="tensord-etcd-")))
    work = Path(tempfile.mkdtemp(prefix="tensord-cluster-"))
    daemons = []
    try:
        for node in ("a", "b"):
            config = (
                f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\nlog_level = "warning"\n'
                f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\n[transport]\nprotocol = "{args.protocol}"\n'
            )
            daemons.append(DaemonProcess(work, node, config, env={"TENSORD_LOG_LEVEL": "warning"}).start())
        a, b = daemons
        if args.tensors:
            src = random_tensors(deepseek_shapes(args.tensors, int(args.gib * 2**30)), args.device)
        else:
            src = random_set(llm_shapes(int(args.gib * 2**30)), args.device)
        nbytes = sum(t.numel() * t.element_size() for t in src.values())
        with a.client() as ca:
            ca.put("bench/remote", src, device=args.device)
        with b.client() as cb:
            cb.get("bench/remote", names=["model.norm.weight"])  # start the client's engine
            engine = cb._transport()
            pin, manifest, slab = cb._open("bench/remote", None)
            dst = torch.empty(manifest.nbytes, dtype=torch.uint8, device=args.to)
            base, length, _ = memory_range(dst)
            one = Batch(np.array([dst.data_ptr()]), np.array([slab.address]), np.array([manifest.nbytes]))  # type: ignore[attr-defined]
            with current(args.to):
                engine.register(base, length)
            raw = median_seconds(
                lambda: engine.read(slab.session, one),  # type: ignore[attr-defined]
                args.runs,
            )
            window = min(window_for(manifest.nbytes), manifest.nbytes)  # a staged load_into reads one window a call
            starts = list(range(0, manifest.nbytes, window))
            windowed = median_seconds(
                lambda: [
                    engine.read(  # type: ignore[attr-defined]
                        slab.session,  # type: ignore[attr-defined]
                        Batch(
                            np.array([dst.data_ptr() + (i % 2) * window]),
                            np.array([slab.address + at]),  # type: ignore[attr-defined]
                            np.array([min(window, manifest.nbytes - at)]),
                        ),
                    )
                    for i, at in enumerate(starts)
                ],
                args.runs,
            )
            with current(args.to):
                engine.unregister(base)

            def raw_fresh() -> None:  # what a get must also do: fresh memory, registered for the read
                fresh = torch.empty(manifest.nbytes, dtype=torch.uint8, device=args.to)
                start, size, _ = memory_range(fresh)
                with current(args.to):
                    engine.register(start, size)
                batch = Batch(np.array([fresh.data_ptr()]), np.array([slab.address]), np.array([manifest.nbytes]))  # type: ignore[attr-defined]
                engine.read(slab.session, batch)  # type: ignore[attr-defined]
                with current(args.to):
                    engine.unregister(start)

            raw_new = median_seconds(raw_fresh, args.runs)
            cb._release(pin)
            get = median_seconds(lambda: cb.get("bench/remote", device=args.to), args.runs)
            targets = {k: torch.empty_like(t, device=args.to) for k, t in src.items()}
            load = median_seconds(lambda: cb.load_into(targets, "bench/remote"), args.runs)
            kind = "DeepSeek-like" if args.tensors else "LLM-shaped bf16"
            print(
                f"{len(src)} {kind} tensors, {nbytes / 2**30:.2f} GiB on node A ({args.device}), "
                f"read from node B's socket into {args.to} over {args.protocol}; ratio = limit / tensord"
            )
            print(row("raw engine read into registered memory, one entry", nbytes, raw))
            print(row("raw engine read into fresh memory (allocate+register)", nbytes, raw_new))
            print(row(f"raw engine read, one call per {window >> 20} MiB window", nbytes, windowed))
            if args.device.startswith("cuda") and args.to.startswith("cuda") and args.device != args.to:
                flat = torch.empty(nbytes, dtype=torch.uint8, device=args.device)
                peer = median_seconds(lambda: flat.to(args.to), args.runs)
                del flat
                print(row(f"peer copy {args.device} -> {args.to}", nbytes, peer))
                print(row("tensord get (vs peer copy)", nbytes, get, peer))
            print(row("tensord get (vs raw read into fresh memory)", nbytes, get, raw_new))
            print(row("tensord load_into (vs raw read into registered memory)", nbytes, load, raw))
            print(row("tensord load_into (vs the raw windowed read)", nbytes, load, windowed))
            if args.profile:  # where a remote load_into and get spend their time
                for label, call in (
                    ("load_into", lambda: cb.load_into(targets, "bench/remote")),
                    ("get", lambda: cb.get("bench/remote", device=args.to)),
                ):
                    profile(label, call)
            watch_latency(a, b)
    finally:
        for d in daemons:
            d.kill()
        etcd.stop(kill=True)
        etcd.cleanup()
    sync()


def watch_latency(a: DaemonProcess, b: DaemonProcess, rounds: int = 20) -> None:
    """From the commit request on node A to the version arriving at a watcher on node B."""
    import threading

    arrived: dict[int, float] = {}
    with a.client() as ca:
        ca.put("bench/watched", {"x": torch.zeros(1)})
        stream = b.client().watch("bench/watched", timeout=30)
        ready = threading.Event()

        def follow() -> None:
            ready.set()
            for version in stream:
                arrived[version] = time.perf_counter()
                if len(arrived) == rounds:
                    return

        t = threading.Thread(target=follow)
        t.start()
        ready.wait()
        time.sleep(0.5)
        started: dict[int, float] = {}
        for i in range(rounds):
            with ca.reserve("bench/watched", {"x": ("float32", (1,))}) as r:
                r.write("x", torch.tensor([float(i)]))
                t0 = time.perf_counter()
                started[r.commit()] = t0
            time.sleep(0.05)
        t.join(60)
    lat = [arrived[v] - started[v] for v in started if v in arrived]
    print(
        f"  commit-to-watch notification across nodes: median {statistics.median(lat) * 1e3:.1f} ms, "
        f"max {max(lat) * 1e3:.1f} ms over {len(lat)} commits"
    )


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(REPO))
    main()
