"""A fresh process's `info(name, tensors=True)` of a 90k-tensor host set: the table as columns.

    python benchmarks/info_columns.py [--tensors 90000] [--runs 7]

A DeepSeek-like set (fp8 weights, fp32 scales, bf16 norms; separate allocations, shuffled) is
put once on a daemon in host memory. Each row runs in a fresh interpreter that has imported
`sdk` and opens its connection inside the timed part (as a starting engine does), median of
--runs after one warm-up:
- the call: connect, hello, `info(tensors=True)` (the table as columns, decoded without
  numpy into a mapping whose rows are built when looked at), then one row looked up by a name
  the caller knows;
- then every row built (`dict(info["tensors"].items())`), what a caller walking them all pays;
- the old form, one dict per tensor on the wire (`tensors: true`), for comparison;
- the limit: connect, hello and `info` without the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys

from _common import deepseek_shapes, random_tensors, start_daemon

from tests.daemons import child_env

CHILD = r"""
import json, sys, time
import sdk.catalogue
name, what = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
c = sdk.catalogue.CatalogueClient()
if what == "columns":
    info = c.info(name, tensors=True)
    rows = info["tensors"]
    rows[sys.argv[3]]  # one name the caller knows
elif what == "old rows":
    result, _ = c._conn().call("info", name=name, tensors=True)
    rows = result["tensors"]
else:
    info = c.info(name)
t1 = time.perf_counter()
walk = len(dict(rows.items())) if what == "columns" else 0
t2 = time.perf_counter()
print(json.dumps({"call": t1 - t0, "walk": t2 - t1}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=90_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    shapes = deepseek_shapes(args.tensors, 256 << 20)
    keys = list(shapes)
    random.Random(0).shuffle(keys)
    daemon = start_daemon()
    try:
        with daemon.client() as c:
            tensors = random_tensors({k: shapes[k] for k in keys}, "cpu")
            c.put("bench/info", tensors)
            del tensors
        env = child_env(TENSORD_SOCKET=daemon.socket)

        def run(what: str) -> dict[str, float]:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, "bench/info", what, keys[len(keys) // 2]],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            return json.loads(out.stdout)

        print(f"fresh process, {len(shapes)} tensors, host set, median of {args.runs} (ms)")
        for what in ("no table (limit)", "columns", "old rows"):
            run(what)
            got = [run(what) for _ in range(args.runs)]
            call = statistics.median(g["call"] for g in got) * 1e3
            walk = statistics.median(g["walk"] for g in got) * 1e3
            extra = f"   then every row built: {walk:7.1f}" if what == "columns" else ""
            print(f"  info(tensors=True), {what:<18} {call:7.1f}{extra}")
    finally:
        daemon.kill()


if __name__ == "__main__":
    main()
