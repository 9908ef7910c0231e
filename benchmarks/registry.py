"""Registry latency with a large manifest: `info` and `open` (resolve + manifest) of a set of
10,000 tensors, with the embedded registry and with etcd.

    python benchmarks/registry.py [--tensors 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO  # noqa: F401  (puts the repo on sys.path)

from tests.daemons import DaemonProcess
from tests.etcd_server import start_etcd


def measure(daemon: DaemonProcess, label: str, n: int, runs: int = 20) -> None:
    with daemon.client() as c:
        c.put("bench/many", {f"model.layers.{i // 10}.part{i % 10}.weight": torch.zeros(4) for i in range(n)})
        for what, call in (
            ("info", lambda: c.info("bench/many")),
            ("open + release (resolve, manifest)", lambda: c._release(c._open("bench/many", None)[0])),
        ):
            call()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            print(f"  {label:<9} {what:<36} median {statistics.median(times) * 1e3:7.2f} ms  (limit 50 ms)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", type=int, default=10_000)
    args = p.parse_args()
    print(f"a set of {args.tensors} tensors")
    work = Path(tempfile.mkdtemp(prefix="tensord-registry-"))
    local = DaemonProcess(work, "local", env={"TENSORD_LOG_LEVEL": "warning"}).start()
    try:
        measure(local, "embedded", args.tensors)
    finally:
        local.kill()
    (work / "etcd").mkdir()
    etcd = start_etcd(work / "etcd")
    node = DaemonProcess(
        work,
        "etcd",
        f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\n[transport]\nprotocol = "off"\n',
        env={"TENSORD_LOG_LEVEL": "warning"},
    ).start()
    try:
        measure(node, "etcd", args.tensors)
    finally:
        node.kill()
        etcd.stop(kill=True)
        etcd.cleanup()


if __name__ == "__main__":
    main()
