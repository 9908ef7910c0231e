"""Engines (issue 10): a real vLLM engine (.venv-vllm, scripts/setup-vllm.sh) started with its
weights from tensord vs from its safetensors files, and the RL swap (trainer put -> engine
serving the new version) vs vLLM's own reload from a checkpoint the trainer writes.

    .venv/bin/python benchmarks/engines.py [--runs 3] [--large-hidden 1024 --large-layers 24]

Models: all-MiniLM-L6-v2 (the real weights, 91 MB) and a BERT of the same family with random
weights (default: BERT-large shape, 1.34 GB float32), both served as embedding models on CPU.
Start-to-ready: process spawn to the first embedding answered, median of --runs; files warm in
the page cache or evicted from it (cold), the set in a host slab. Prints the ratios (tensord / files; < 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import start_daemon  # puts the repository on sys.path
from safetensors.torch import load_file, save_file

import sdk
from tests.daemons import MINILM_DIR, WEIGHTS
from tests.vllm_procs import VllmDriver, bare_model_dir, vllm_python

LOADED = re.compile(r"tensord: loaded \S+ v\d+ \(\w+ set, [\d.]+ GB\) in ([\d.]+) s")
FILES = re.compile(r"Loading weights took ([\d.]+) seconds")


def large_model(root: Path, hidden: int, layers: int) -> Path:
    """A random-weight BERT of MiniLM's family (its tokenizer and pooling), `hidden` wide."""
    import transformers

    assert MINILM_DIR is not None
    d = bare_model_dir(root / f"bert-{hidden}x{layers}")
    config = json.loads((MINILM_DIR / "config.json").read_text())
    config.update(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  intermediate_size=4 * hidden)  # fmt: skip
    (d / "config.json").write_text(json.dumps(config))
    pooling = json.loads((MINILM_DIR / "1_Pooling" / "config.json").read_text())
    pooling["word_embedding_dimension"] = hidden
    (d / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**config), add_pooling_layer=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
    return d


def start(
    python: str, model_dir: Path, options: dict | None, socket: str, log: Path
) -> tuple[float, float, VllmDriver]:
    """(spawn-to-ready seconds, weight-loading seconds from the engine's log, the engine)."""
    t = time.perf_counter()
    engine = VllmDriver(python, model_dir, options, socket, log)
    engine.ready(600)
    ready = time.perf_counter() - t
    found = (FILES if options is None else LOADED).findall(engine.output())
    return ready, float(found[-1]) if found else float("nan"), engine


def evict(path: Path) -> None:
    """Drop one file's pages from the page cache (only that file: the machine is shared)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def startup(python: str, model_dir: Path, name: str, socket: str, work: Path, runs: int) -> dict[str, float]:
    """Medians over `runs` of four starts: from the files (warm, and cold: evicted from the page
    cache first), from the whole set (through vLLM's
    load_weights), from the rank set (vLLM's layout, `load_into` straight into the parameters;
    published once beforehand by an engine with "publish": "params")."""
    bare = bare_model_dir(work / f"{model_dir.name}-bare", source=model_dir)
    ranked = f"{name}-ranked"
    with sdk.Client(socket) as c:
        c.put(ranked, load_file(model_dir / "model.safetensors"))
    *_, seeder = start(python, bare, {"name": ranked, "publish": "params"}, socket, work / f"{name}-seed.log")
    seeder.close()
    kinds = (("files", model_dir, None), ("cold", model_dir, None), ("whole", bare, {"name": name, "strict": True}),
             ("rank", bare, {"name": ranked, "strict": True}))  # fmt: skip
    out: dict[str, list[float]] = {f"{k}{suffix}": [] for k, _, _ in kinds for suffix in ("", "_load")}
    for i in range(runs):
        for kind, d, options in kinds:
            if kind == "cold":
                evict(d / "model.safetensors")
            ready, load, engine = start(python, d, options, socket, work / f"{model_dir.name}-{kind}-{i}.log")
            engine.close()
            out[kind].append(ready)
            out[f"{kind}_load"].append(load)
    return {k: statistics.median(v) for k, v in out.items()}


def rl_swap(python: str, model_dir: Path, name: str, socket: str, work: Path, runs: int) -> dict[str, float]:
    """Trainer (this process) puts a new version; the engine pulls it (`update`). Against: the
    trainer saves a checkpoint, the engine reloads it with vLLM's own reload_weights. Each
    route's parts are those of its median round."""
    base = load_file(model_dir / "model.safetensors")
    with sdk.Client(socket) as client:
        client.put(name, base)
    ckpt_dir = bare_model_dir(work / f"{name}-ckpt", source=model_dir)
    # Started from its files: vLLM's reload_weights (the file path) reloads with the engine's loader.
    engine = VllmDriver(python, model_dir, None, socket, work / f"{name}.log")
    engine.ready(600)
    rounds: list[dict[str, float]] = []
    try:
        with sdk.Client(socket) as client:
            for i in range(runs + 1):  # the first round warms up
                weights = {k: v + (i + 1) * 1e-3 if v.is_floating_point() else v for k, v in base.items()}
                t0 = time.perf_counter()
                version = client.put(name, weights)
                t1 = time.perf_counter()
                engine.call("update", name=name, version=version)
                t2 = time.perf_counter()
                save_file(weights, ckpt_dir / "model.safetensors")
                t3 = time.perf_counter()
                engine.call("reload_files", path=str(ckpt_dir))
                t4 = time.perf_counter()
                copies = {k: v.clone() for k, v in weights.items()}
                t5 = time.perf_counter()
                del copies
                client.delete(name, version - 1)  # keep one version in memory
                if i:
                    rounds.append({"put": t1 - t0, "pull": t2 - t1, "swap": t2 - t0, "save": t3 - t2,
                                   "reload": t4 - t3, "file_swap": t4 - t2, "clone": t5 - t4})  # fmt: skip
            client.delete(name)
    finally:
        engine.close()
    by_swap = sorted(rounds, key=lambda r: r["swap"])[len(rounds) // 2]
    by_file = sorted(rounds, key=lambda r: r["file_swap"])[len(rounds) // 2]
    return {
        **{k: by_swap[k] for k in ("put", "pull", "swap")},
        **{k: by_file[k] for k in ("save", "reload", "file_swap")},
        "clone": statistics.median(r["clone"] for r in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large-hidden", type=int, default=1024, help="0: MiniLM only")
    parser.add_argument("--large-layers", type=int, default=24)
    parser.add_argument("--only", choices=["startup", "rl"], help="one of the two tables")
    args = parser.parse_args()
    python = vllm_python()
    if python is None:
        sys.exit("no vLLM venv: run scripts/setup-vllm.sh")
    work = Path(tempfile.mkdtemp(prefix="tensord-engines-"))
    daemon = start_daemon()
    try:
        models = [("minilm", bare_model_dir(work / "minilm", WEIGHTS))]
        if args.large_hidden:
            models.append(("bert-large-random", large_model(work, args.large_hidden, args.large_layers)))
        kinds = "files warm / cold / whole set / rank set"
        print(f"| model | GB | start-to-ready (s): {kinds} | whole, rank / warm files "
              f"| weight loading (s): {kinds} | whole, rank / warm files |", flush=True)  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |", flush=True)
        for name, d in models if args.only != "rl" else []:
            with daemon.client() as c:
                c.put(name, load_file(d / "model.safetensors"))
                gb = c.info(name)["nbytes"] / 1e9
            r = startup(python, d, name, daemon.socket, work, args.runs)
            ready = (f"{r['files']:.1f} / {r['cold']:.1f} / {r['whole']:.1f} / {r['rank']:.1f} "
                     f"| {r['whole'] / r['files']:.2f}x / {r['rank'] / r['files']:.2f}x")  # fmt: skip
            fl = r["files_load"]
            load = (f"{fl:.2f} / {r['cold_load']:.2f} / {r['whole_load']:.2f} / {r['rank_load']:.2f} "
                    f"| {r['whole_load'] / fl:.2f}x / {r['rank_load'] / fl:.2f}x")  # fmt: skip
            print(f"| {name} | {gb:.2f} | {ready} | {load} |", flush=True)
            with daemon.client() as c:  # free the memory (and huge pages) for what follows
                for set_name in (name, f"{name}-ranked", f"{name}-ranked/tp0"):
                    c.delete(set_name)
        print(flush=True)
        print(
            "| model | trainer put | engine pull | swap | vs save_file + vLLM reload_weights | vs clone of the bytes |"
        )
        print("| --- | --- | --- | --- | --- | --- |", flush=True)
        for name, d in models if args.only != "startup" else []:
            s = rl_swap(python, d, f"{name}-rl", daemon.socket, work, args.runs)
            print(f"| {name} | {s['put']:.3f} s | {s['pull']:.3f} s | {s['swap']:.3f} s "
                  f"| {s['save']:.3f} + {s['reload']:.3f} = {s['file_swap']:.3f} s: {s['swap'] / s['file_swap']:.2f}x "
                  f"| {s['clone']:.3f} s: {s['swap'] / s['clone']:.1f}x |", flush=True)  # fmt: skip
    except BaseException:
        print(f"failed: the engines' logs are in {work}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        daemon.kill()


if __name__ == "__main__":
    main()
