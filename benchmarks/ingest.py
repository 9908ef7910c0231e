"""Checkpoint ingest: `tensord load` against the disk limit and safetensors, cold and warm.

On one file (a random checkpoint of LLM-shaped bf16 tensors generated in a temporary directory,
or --path), each of these is timed cold (the file's page cache dropped) and warm; the median
of --runs after --warmup is printed in GB/s of tensor data, with ratios:

  raw read 1 thread   os.preadv of the whole file, in order, into one reused buffer (pinned for
                      a GPU device): the disk limit as the issue defines it
  raw read N threads  the same with --threads readers on interleaved chunks (DESIGN: the best
                      raw read is the limit)
  raw read -> slab    the same, each piece read straight to its place in a new host slab (the
  raw read -> gpu     daemon's kind: huge pages where the kernel gives them) or copied to its
                      place in one GPU buffer: a plain copy of the same bytes to where a load
                      puts them, without fingerprints
  fresh slab fill     (cpu) copying the same number of bytes into a new host slab: what it
                      costs this machine to give a slab its pages, whatever the source
  load_file           safetensors.torch.load_file(path, device=--device); on cpu it maps the
                      file and returns before reading it, so "load_file + clone" (every tensor
                      copied into private memory, as loading a state_dict does) is also shown
  fastsafetensors     when it imports
  tensord load        tensord.cli.checkpoints.load_checkpoint through a real daemon started here

Example: ``.venv/bin/python benchmarks/ingest.py --gib 1.5 --runs 3`` (add ``--device cuda:0``
on a GPU host).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import load_file

from tensord.checkpoint import read_checkpoint
from tensord.cli.checkpoints import load_checkpoint
from tensord.export import write_safetensors
from tensord.ingest import default_threads
from tensord.memory import HostSlab
from tensord_dataplane.mapping import Mapping
from tests.daemons import DaemonProcess

MiB = 1 << 20
READ_CHUNK = 16 * MiB


def generate(path: Path, gib: float) -> None:
    """Llama-shaped bf16 tensors (hidden 2048, GQA 4:1, intermediate 5632) of random bits."""
    hidden, kv, inter, vocab = 2048, 512, 5632, 32000
    layer: dict[str, tuple[int, ...]] = {
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    per_layer = sum(math.prod(s) for s in layer.values()) * 2
    fixed = 2 * vocab * hidden * 2
    layers = max(1, round((gib * (1 << 30) - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.{k}": s for k, s in layer.items()}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    gen = torch.Generator().manual_seed(0)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in shapes.items():
            bits = torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=gen)
            yield name, bits.view(torch.bfloat16)

    write_safetensors(path, tensors, {"format": "pt"})


# -- page cache -------------------------------------------------------------------------------------


def drop_cache(path: Path) -> str:
    """Evict the file from the page cache; say how."""
    how = "posix_fadvise(DONTNEED)"
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        how += " + drop_caches"
    except OSError:
        pass
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return how


# -- the contenders -------------------------------------------------------------------------------------


def raw_read(path: Path, threads: int, device: str, sink: bool = False) -> Callable[[], None]:
    """Read the file in READ_CHUNK pieces (interleaved over `threads`) into reused buffers.

    `sink`: also put every piece at its place in fresh memory on `device` (read straight into
    a new host slab for cpu, copied into one GPU buffer for cuda): the plain copy of the same
    bytes that a load does.
    """
    size = os.path.getsize(path)
    gpu = device.startswith("cuda")
    bufs = [torch.empty(READ_CHUNK, dtype=torch.uint8, pin_memory=gpu) for _ in range(threads)]
    target = torch.empty(size, dtype=torch.uint8, device=device) if sink and gpu else None

    def run() -> None:
        fd = os.open(path, os.O_RDONLY)
        slab = HostSlab(size, "bench-raw", huge=True) if sink and not gpu else None
        mapping = Mapping(slab.fd, slab.size, writable=True) if slab is not None else None
        dest = mapping.tensor() if mapping is not None else None

        def reader(i: int) -> None:
            for off in range(i * READ_CHUNK, size, threads * READ_CHUNK):
                n = min(READ_CHUNK, size - off)
                buf = dest[off : off + n] if dest is not None else bufs[i][:n]
                mv, done = buf.numpy().data, 0
                while done < n:
                    got = os.preadv(fd, [mv[done:]], off + done)
                    if got <= 0:
                        break
                    done += got
                if target is not None:
                    target[off : off + done].copy_(bufs[i][:done])

        try:
            on_threads(reader, threads)
        finally:
            os.close(fd)
            if mapping is not None and slab is not None:
                mapping.close()
                slab.free()

    return run


def slab_fill(nbytes: int, threads: int) -> Callable[[], None]:
    src = torch.ones(READ_CHUNK, dtype=torch.uint8)

    def run() -> None:
        slab = HostSlab(nbytes, "bench-fill", huge=True)
        mapping = Mapping(slab.fd, slab.size, writable=True)
        dest = mapping.tensor()

        def writer(i: int) -> None:
            for off in range(i * READ_CHUNK, nbytes, threads * READ_CHUNK):
                n = min(READ_CHUNK, nbytes - off)
                dest[off : off + n].copy_(src[:n])

        try:
            on_threads(writer, threads)
        finally:
            mapping.close()
            slab.free()

    return run


def on_threads(work: Callable[[int], None], threads: int) -> None:
    """Run work(0) ... work(threads - 1) on threads of their own; wait for all."""
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def safetensors_load(path: Path, device: str, clone: bool) -> Callable[[], object]:
    def run() -> object:
        tensors = load_file(path, device=device)
        if clone:
            tensors = {k: v.clone() for k, v in tensors.items()}
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return tensors  # freed after the clock stops

    return run


def fastsafetensors_load(path: Path, device: str) -> Callable[[], object] | None:
    try:
        from fastsafetensors import fastsafe_open
    except ImportError:
        return None

    def run() -> object:
        with fastsafe_open(filenames=[str(path)], nogds=True, device=device) as f:
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return tensors

    return run


def tensord_load(daemon: DaemonProcess, path: Path, device: str, threads: int) -> Callable[[], object]:
    def run() -> object:
        with daemon.client() as client:
            load_checkpoint(client, path, "bench/ingest", device=device, threads=threads)
        return delete

    def delete() -> None:  # after the clock stops: every run writes a fresh slab
        with daemon.client() as client:
            client.delete("bench/ingest")

    return run


# -- timing ---------------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], path: Path, *, cold: bool, runs: int, warmup: int) -> float:
    """Median seconds of `runs` after `warmup`; the page cache is dropped before each when cold.

    What `fn` returns is released after the clock stops (called first if it is callable).
    """
    times = []
    for i in range(warmup + runs):
        if cold:
            drop_cache(path)
        else:
            fd = os.open(path, os.O_RDONLY)  # make sure the whole file is cached
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            os.close(fd)
        start = time.perf_counter()
        result = fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if callable(result):
            result()
        del result
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, help="a .safetensors file (default: generate one)")
    parser.add_argument("--gib", type=float, default=1.5, help="size of the generated file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--threads", type=int, help="reader threads (default: what tensord load uses)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--only", help="comma-separated row names to run (e.g. 'tensord load')")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    gpu = args.device.startswith("cuda")
    args.threads = args.threads or default_threads(args.device)

    with tempfile.TemporaryDirectory(prefix="tensord-bench-") as tmp:
        path = args.path
        if path is None:
            path = Path(tmp) / "model.safetensors"
            t0 = time.perf_counter()
            generate(path, args.gib)
            seconds = time.perf_counter() - t0
            print(f"generated {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {seconds:.1f} s")
        nbytes = sum(t.nbytes for t in read_checkpoint(path))
        how = drop_cache(path)
        daemon = DaemonProcess(Path(tmp) / "daemon", "bench").start()
        try:
            sink = "gpu" if gpu else "slab"
            contenders: dict[str, Callable[[], object] | None] = {
                "raw read 1 thread": raw_read(path, 1, args.device),
                f"raw read {args.threads} threads": raw_read(path, args.threads, args.device),
                f"raw read -> {sink}": raw_read(path, args.threads, args.device, sink=True),
                "fresh slab fill": None if gpu else slab_fill(nbytes, args.threads),
                f"load_file({args.device})": safetensors_load(path, args.device, clone=False),
                "load_file + clone": None if gpu else safetensors_load(path, args.device, clone=True),
                "fastsafetensors": fastsafetensors_load(path, args.device),
                "tensord load": tensord_load(daemon, path, args.device, args.threads),
            }
            only = set(args.only.split(",")) if args.only else None
            results: dict[str, tuple[float, float]] = {}
            for name, fn in contenders.items():
                if fn is None or (only is not None and name not in only):
                    continue
                # A fresh slab fill reads no file: "cold" is the same as warm.
                cold = measure(fn, path, cold=True, runs=args.runs, warmup=args.warmup)
                warm = measure(fn, path, cold=False, runs=args.runs, warmup=args.warmup)
                results[name] = (nbytes / cold / 1e9, nbytes / warm / 1e9)
                print(f"  {name:24s} cold {results[name][0]:7.2f} GB/s   warm {results[name][1]:7.2f} GB/s")
        finally:
            daemon.kill()
    report(results, args, nbytes, how)


def report(results: dict[str, tuple[float, float]], args: argparse.Namespace, nbytes: int, how: str) -> None:
    print()
    print(
        f"device {args.device}, {nbytes / 1e9:.2f} GB of tensor data, tensord threads {args.threads}, "
        f"median of {args.runs} after {args.warmup} warm-up, cold = {how}"
    )
    if not args.device.startswith("cuda"):
        probe = HostSlab(nbytes, "bench-probe", huge=True)
        print(f"host slabs in huge pages: {'yes' if probe.huge else 'no (the kernel gives none)'}")
        probe.free()
    print(f"{'':24s} {'cold GB/s':>10s} {'warm GB/s':>10s}")
    for name, (cold, warm) in results.items():
        print(f"{name:24s} {cold:10.2f} {warm:10.2f}")
    ours = results.get("tensord load")
    if ours is None:
        return
    print()
    raw = [v for k, v in results.items() if k.startswith("raw read") and "->" not in k]
    rows = [(name, cold, warm) for name, (cold, warm) in results.items() if name != "tensord load"]
    if raw:
        rows.append(("best raw read", max(r[0] for r in raw), max(r[1] for r in raw)))
    for name, cold, warm in rows:
        print(f"tensord / {name:24s} cold {ours[0] / cold:6.2f}x   warm {ours[1] / warm:6.2f}x")


if __name__ == "__main__":
    main()
