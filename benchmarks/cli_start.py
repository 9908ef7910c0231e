"""How long a `tensord` command takes from exec to exit, against a live daemon.

    python benchmarks/cli_start.py [--runs 15]

Each command runs as a user runs it (`python -m tensord ...`, a fresh interpreter every time),
against a daemon holding one small set; the table shows the median and the slowest of --runs
runs after one warm-up. Limits measured in the same run: a bare interpreter (`python -c pass`),
the imports the catalogue commands need, and `import torch` (what every command paid before
the catalogue client, `sdk.catalogue`, stopped importing it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from _common import start_daemon

from tests.daemons import child_env

#: the `ls` command as it ran before: the full client (and torch) imported first
BEFORE = "import sys, sdk.client; from tensord.cli import main; raise SystemExit(main(sys.argv[1:]))"


def timed(cmd: list[str], env: dict[str, str], runs: int) -> tuple[float, float]:
    subprocess.run(cmd, env=env, check=True, capture_output=True)  # warm-up (page cache, pyc)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    daemon = start_daemon()
    try:
        with daemon.client() as c:
            c.put("bench/cli", {f"layer.{i}.weight": torch.zeros(64, 64) for i in range(200)})
        env = child_env(TENSORD_SOCKET=daemon.socket)
        py = [sys.executable]
        rows = [
            ("python -c pass (limit)", [*py, "-c", "pass"]),
            ("import sdk.catalogue, argparse, json", [*py, "-c", "import argparse, json, sdk.catalogue"]),
            ("import torch (what every command paid before)", [*py, "-c", "import torch"]),
            ("tensord --help", [*py, "-m", "tensord", "--help"]),
            ("tensord ls", [*py, "-m", "tensord", "ls"]),
            ("tensord ls with the full client loaded (before)", [*py, "-c", BEFORE, "ls"]),
            ("tensord info bench/cli", [*py, "-m", "tensord", "info", "bench/cli"]),
            ("tensord info bench/cli --tensors", [*py, "-m", "tensord", "info", "bench/cli", "--tensors"]),
            ("tensord status", [*py, "-m", "tensord", "status"]),
            ("tensord nodes", [*py, "-m", "tensord", "nodes"]),
            ("tensord rm bench/none (idempotent)", [*py, "-m", "tensord", "rm", "bench/none"]),
        ]
        print(f"command start-to-exit, median / max of {args.runs} runs (target <= 0.3 s)")
        for label, cmd in rows:
            median, worst = timed(cmd, env, args.runs)
            print(f"  {label:<48} {median * 1e3:7.1f} ms / {worst * 1e3:7.1f} ms")
    finally:
        daemon.kill()


if __name__ == "__main__":
    main()
