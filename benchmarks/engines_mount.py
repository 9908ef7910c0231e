"""Engines that mount (issue 22): what each vLLM engine adds to the machine's memory, and how
long it takes to start, with its weights from its files (vLLM's own loader) vs mounted from the
store (``"mount": true``), on CPU with the real vLLM of .venv-vllm.

    .venv/bin/python benchmarks/engines_mount.py [--runs 3] [--hidden 1024 --layers 24] [--engines 2]

Model: a BERT of all-MiniLM-L6-v2's family with random weights (default: BERT-large shape,
1.34 GB float32), served as an embedding model. For each engine: spawn-to-ready seconds, the
loader's own seconds (vLLM's "Loading weights took" / tensord's "mounted ... in"), its process
tree's anonymous memory (what it allocated or copied; mapped slab pages are not in it) and the
bytes of the slab it copied on write (pagemap). The limit for a mounted engine's weight memory
is 0 bytes; a files engine's is one copy of the set. Medians over --runs; the machine is named
by the caller.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from _common import start_daemon  # puts the repository on sys.path
from engines import large_model

import sdk
from tests.vllm_procs import VllmDriver, bare_model_dir, copied_bytes, process_tree, vllm_python

FILES = re.compile(r"Loading weights took ([\d.]+) seconds")
MOUNTED = re.compile(r"tensord: mounted \S+ v\d+ \(\d+ tensors, [\d.]+ GB\) in ([\d.]+) s")
HANDED = re.compile(r"tensord: handed its post-processed tensors to the store as \S+ v\d+ .* in ([\d.]+) s")


def anonymous(pid: int) -> int:
    """Anonymous bytes of a process tree (Anonymous: in smaps_rollup)."""
    total = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Anonymous:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def start(python: str, model_dir: Path, options: dict | None, socket: str, log: Path, pattern: re.Pattern[str]):
    t = time.perf_counter()
    engine = VllmDriver(python, model_dir, options, socket, log)
    engine.ready(900)
    ready = time.perf_counter() - t
    found = pattern.findall(engine.output())
    return engine, {"ready": ready, "load": float(found[-1]) if found else float("nan")}


def one_run(python: str, model_dir: Path, socket: str, work: Path, engines: int, run: int) -> dict[str, float]:
    bare = bare_model_dir(work / f"bare-{run}", source=model_dir)
    name = f"mount-bench-{run}"
    out: dict[str, float] = {}
    running = []
    try:
        files, t = start(python, model_dir, None, socket, work / f"files-{run}.log", FILES)
        out |= {f"files_{k}": v for k, v in t.items()} | {"files_anon": anonymous(files.proc.pid)}
        files.close()
        first, t = start(python, model_dir, {"name": name, "mount": True}, socket, work / f"first-{run}.log", HANDED)
        running.append(first)
        out |= {f"first_{k}": v for k, v in t.items()} | {"first_anon": anonymous(first.proc.pid)}
        for i in range(1, engines):
            options = {"name": name, "mount": True, "strict": True}
            engine, t = start(python, bare, options, socket, work / f"mounted-{run}-{i}.log", MOUNTED)
            running.append(engine)
            if i == 1:
                out |= {f"mounted_{k}": v for k, v in t.items()}
                out |= {"mounted_anon": anonymous(engine.proc.pid), "mounted_copied": copied_bytes(engine.proc.pid)}
        with sdk.Client(socket) as c:
            out["set_bytes"] = float(c.info(f"{name}/tp0/processed")["nbytes"])
            out["store_held"] = float(c.status()["devices"]["cpu"]["held"])
            c.delete(f"{name}/tp0/processed")
    finally:
        for engine in running:
            engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--engines", type=int, default=2, help="engines mounting at once (first included)")
    args = parser.parse_args()
    python = vllm_python()
    if python is None:
        raise SystemExit("no vLLM venv: run scripts/setup-vllm.sh")
    work = Path(tempfile.mkdtemp(prefix="tensord-mount-bench-"))
    model_dir = large_model(work, args.hidden, args.layers)
    daemon = start_daemon()
    try:
        runs = [one_run(python, model_dir, daemon.socket, work, args.engines, i) for i in range(args.runs)]
    finally:
        daemon.kill()
    m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    gb = m["set_bytes"] / 1e9
    print(f"model: BERT {args.hidden}x{args.layers}, engine set {gb:.2f} GB float32; medians of {args.runs} runs")
    print("engine                 ready s  load s  anonymous GB  weight bytes copied")
    rows = (("files (vLLM default)", "files", "one copy"), ("first, mount mode", "first", "(moved to the store)"),
            ("later, mount mode", "mounted", f"{m['mounted_copied']:.0f} B"))  # fmt: skip
    for label, key, copied in rows:
        print(f"{label:22} {m[key + '_ready']:7.1f} {m[key + '_load']:7.2f} {m[key + '_anon'] / 1e9:13.2f}  {copied}")
    saved = (m["files_anon"] - m["mounted_anon"]) / m["set_bytes"]
    print(f"a mounted engine holds {(m['files_anon'] - m['mounted_anon']) / 1e9:.2f} GB less than a files engine "
          f"= {saved:.2f}x the set (limit: 1.00x, the whole copy)")  # fmt: skip
    print(f"mounted load / files load: {m['mounted_load'] / m['files_load']:.3f}x; "
          f"store holds {m['store_held'] / m['set_bytes']:.2f}x the set for {args.engines} engines")  # fmt: skip


if __name__ == "__main__":
    main()
