"""Restore after a restart, against the load that first brought the bytes in; and what the
state directory costs a commit.

    python benchmarks/restore.py [--gib 1] [--runs 3] [--no-cluster]

1. One node (embedded registry, state directory): an LLM-shaped bf16 checkpoint loaded by the
   daemon, SIGKILL, restart; the time until the socket accepts and until the restore is done
   (it runs in the background). The limit: a daemon-side load of the same file by a freshly
   started daemon, also right after the SIGKILL of a daemon that held those bytes.
2. Two nodes (etcd, Mooncake TE over TCP on loopback): node B holds a replica of a put, is
   SIGKILLed and restarted, and copies it back from node A (the limit: `replicate` of the same
   version onto a fresh node, measured in the same run).
3. A small put's latency with and without a state directory (each commit writes its version
   counter and its catalogue record durably).
Medians of --runs; the checkpoint is read warm (page cache) after the first load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import llm_shapes, random_set
from safetensors.torch import save_file

from tests.daemons import DaemonProcess
from tests.etcd_server import free_port, start_etcd


def wait_restored(client, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        restore = client.status()["restore"]
        if restore is None or restore["state"] in ("done", "none"):
            return restore
        time.sleep(0.1)  # the restore's own clock is what counts; polling costs it GIL time
    raise TimeoutError("restore did not finish")


def one_node(gib: float, runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="tensord-restore-"))
    models = work / "models"
    models.mkdir()
    tensors = random_set(llm_shapes(int(gib * 2**30)), "cpu")
    nbytes = sum(t.nbytes for t in tensors.values())
    save_file(tensors, models / "ckpt.safetensors")
    del tensors
    roots = f'[ingest]\nallowed_roots = ["{models}"]\n'
    keeper = DaemonProcess(work / "d", "keeper", f'[daemon]\nstate_dir = "{work / "state"}"\n{roots}')
    plain = DaemonProcess(work / "d", "plain", roots)  # no state directory: restores nothing
    loads, listens, restores = [], [], []
    try:
        with keeper.start().client() as c:
            c.load_checkpoint(str(models / "ckpt.safetensors"), "bench/ckpt")
        for run in range(runs + 1):
            # Each measurement follows the SIGKILL of a daemon holding the checkpoint's bytes,
            # as a restore does (the kernel is still taking back its huge pages).
            keeper.kill()
            with plain.start(timeout=120).client() as c:  # the limit: a load by a fresh daemon
                t0 = time.perf_counter()
                c.load_checkpoint(str(models / "ckpt.safetensors"), "bench/ckpt")
                load = time.perf_counter() - t0
            plain.kill()
            t0 = time.perf_counter()
            keeper.start(timeout=120)
            listen = time.perf_counter() - t0
            with keeper.client() as c:
                restore = wait_restored(c)
                assert restore["restored"] == 1, restore
            if run:  # the first round warms the page cache
                loads.append(load)
                listens.append(listen)
                restores.append(restore["seconds"])
    finally:
        keeper.kill()
        plain.kill()
    load, restore = statistics.median(loads), statistics.median(restores)
    print(f"one node, {nbytes / 2**30:.2f} GiB checkpoint ({len(llm_shapes(int(gib * 2**30)))} tensors), warm:")
    print(f"  load by a fresh daemon (limit)      {load:7.3f} s  {nbytes / load / 1e9:6.2f} GB/s  {_spread(loads)}")
    print(f"  restart to socket accepting         {statistics.median(listens):7.3f} s  (Python + torch import)")
    print(
        f"  restore after SIGKILL (background)  {restore:7.3f} s  {nbytes / restore / 1e9:6.2f} GB/s"
        f"  {load / restore:.2f}x the load  {_spread(restores)}"
    )


def _spread(times: list[float]) -> str:
    return f"(runs {min(times):.2f}-{max(times):.2f} s)"


def two_nodes(gib: float, runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="tensord-restore-peer-"))
    (work / "etcd").mkdir()
    etcd = start_etcd(work / "etcd")

    def node(name: str) -> DaemonProcess:
        config = (
            f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\nstate_dir = "{work / name}"\n'
            f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = 2\n[transport]\nprotocol = "tcp"\n'
        )
        return DaemonProcess(work / "d", name, config).start(timeout=120)

    a, b, fresh = node("pa"), node("pb"), node("pc")
    replicates, restores = [], []
    try:
        src = random_set(llm_shapes(int(gib * 2**30)), "cpu")
        nbytes = sum(t.nbytes for t in src.values())
        for run in range(runs + 1):
            with a.client() as ca:  # a new version each round; the older ones go everywhere
                version = ca.put("bench/peer", src)
                for old in range(1, version):
                    ca.delete("bench/peer", old)
            with fresh.client() as cf:
                t0 = time.perf_counter()
                cf.replicate("bench/peer", version)
                replicate = time.perf_counter() - t0
            with b.client() as cb:
                cb.replicate("bench/peer", version)
            b.kill()
            b.start(timeout=120)
            with b.client() as cb:
                restore = wait_restored(cb)
                assert restore["restored"] == 1, restore
            if run:
                replicates.append(replicate)
                restores.append(restore["seconds"])
    finally:
        for d in (a, b, fresh):
            d.kill()
        etcd.stop(kill=True)
        etcd.cleanup()
    rep, res = statistics.median(replicates), statistics.median(restores)
    print(f"two nodes, {nbytes / 2**30:.2f} GiB put on A, B restarted (SIGKILL), Mooncake TE TCP loopback:")
    print(f"  replicate onto a fresh node (limit)  {rep:7.3f} s  {nbytes / rep / 1e9:6.2f} GB/s  {_spread(replicates)}")
    print(
        f"  restore from the peer                {res:7.3f} s  {nbytes / res / 1e9:6.2f} GB/s"
        f"  {rep / res:.2f}x replicate  {_spread(restores)}"
    )


def commit_cost(runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="tensord-commit-"))
    small = {"w": torch.ones(256)}
    out = []
    for label, config in (("no state directory", None), ("state directory", f'[daemon]\nstate_dir = "{work / "s"}"\n')):
        d = DaemonProcess(work / label.replace(" ", "-"), "commit", config).start()
        try:
            with d.client() as c:
                for _ in range(5):
                    c.put("bench/small", small)
                times = []
                for _ in range(max(runs * 20, 50)):
                    t0 = time.perf_counter()
                    c.put("bench/small", small)
                    times.append(time.perf_counter() - t0)
                    c.delete("bench/small", c.info("bench/small")["latest"])
            out.append((label, statistics.median(times)))
        finally:
            d.kill()
    print("a put of one 1 KiB tensor, median:")
    for label, t in out:
        print(f"  {label:<22} {t * 1e3:7.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-cluster", action="store_true")
    args = parser.parse_args()
    one_node(args.gib, args.runs)
    if not args.no_cluster:
        two_nodes(args.gib, args.runs)
    commit_cost(args.runs)


if __name__ == "__main__":
    main()
