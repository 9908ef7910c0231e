"""Probe: what do many-tensor copies cost on this GPU, by each mechanism? Diagnostic.

    python benchmarks/probe_batch_copy.py [--tensors 90000] [--gb 17.7]

A DeepSeek-like set of separate allocations on cuda:0 is copied into one flat buffer (a put's
gather) and back out (a load_into's scatter) by: a Python loop of copy_, torch._foreach_copy_
(views prebuilt), cuMemcpyBatchAsync through ctypes, and a Triton pointer-table kernel; plus
the Python costs around them (building views, reading data_ptr/shape/dtype).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from _common import deepseek_shapes, random_tensors


def timed(label: str, fn: Callable[[], object], runs: int = 5) -> float:
    try:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = sorted(times)[len(times) // 2]
        print(f"  {label:<60} {best * 1e3:9.2f} ms", flush=True)
        return best
    except Exception as exc:  # a probe: report and go on
        print(f"  {label:<60} FAILED: {type(exc).__name__}: {exc}", flush=True)
        return float("nan")


class _Loc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attrs(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", _Loc), ("dstLocHint", _Loc), ("flags", ctypes.c_uint)]


def batch_memcpy() -> Callable[[np.ndarray, np.ndarray, np.ndarray, int], None] | None:
    lib = ctypes.CDLL("libcuda.so.1")
    version = ctypes.c_int()
    lib.cuDriverGetVersion(ctypes.byref(version))
    print(f"  driver CUDA version {version.value}")
    fn, status = ctypes.c_void_p(), ctypes.c_int()
    get = lib.cuGetProcAddress_v2
    get.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int,
        ctypes.c_uint64,
        ctypes.POINTER(ctypes.c_int),
    ]
    want = 13000 if version.value >= 13000 else 12080
    rc = get(b"cuMemcpyBatchAsync", ctypes.byref(fn), want, 0, ctypes.byref(status))
    print(f"  cuGetProcAddress(cuMemcpyBatchAsync, {want}) rc={rc} status={status.value} fn={fn.value}")
    if rc != 0 or not fn.value:
        return None
    p = ctypes.c_void_p
    if want >= 13000:
        proto = ctypes.CFUNCTYPE(ctypes.c_int, p, p, p, ctypes.c_size_t, p, p, ctypes.c_size_t, p)
    else:
        proto = ctypes.CFUNCTYPE(ctypes.c_int, p, p, p, ctypes.c_size_t, p, p, ctypes.c_size_t, p, p)
    call = proto(fn.value)
    attrs = _Attrs(1, _Loc(1, 0), _Loc(1, 0), 0)  # order: stream
    idx = (ctypes.c_size_t * 1)(0)

    def run(dst: np.ndarray, src: np.ndarray, size: np.ndarray, stream: int) -> None:
        dst, src, size = (np.ascontiguousarray(a, dtype=np.uint64) for a in (dst, src, size))
        args = [
            dst.ctypes.data,
            src.ctypes.data,
            size.ctypes.data,
            len(dst),
            ctypes.addressof(attrs),
            ctypes.addressof(idx),
            1,
        ]
        if want < 13000:
            fail = ctypes.c_size_t()
            args.append(ctypes.addressof(fail))
        rc = call(*args, stream)
        if rc != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync rc {rc}")

    return run


def triton_copy() -> Callable[[np.ndarray, np.ndarray, np.ndarray, str], None] | None:
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def kernel(dsts, srcs, sizes, BLOCK: tl.constexpr):
        i = tl.program_id(0)
        d = tl.load(dsts + i).to(tl.pointer_type(tl.uint8))
        s = tl.load(srcs + i).to(tl.pointer_type(tl.uint8))
        n = tl.load(sizes + i)
        for start in range(0, n, BLOCK):
            o = start + tl.arange(0, BLOCK)
            tl.store(d + o, tl.load(s + o, mask=o < n), mask=o < n)

    chunk = 1 << 20

    def run(dst: np.ndarray, src: np.ndarray, size: np.ndarray, device: str) -> None:
        # split large copies into 1 MiB pieces so one program never copies a whole embedding
        pieces = np.maximum(1, -(-size // chunk))
        rep = np.repeat(np.arange(len(size)), pieces)
        first = np.cumsum(pieces) - pieces
        k = np.arange(len(rep)) - np.repeat(first, pieces)
        off = k * chunk
        n = np.minimum(size[rep] - off, chunk)
        t = torch.from_numpy(np.stack([dst[rep] + off, src[rep] + off, n]).astype(np.int64)).to(device)
        kernel[(len(rep),)](t[0], t[1], t[2], BLOCK=4096)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=90_000)
    ap.add_argument("--gb", type=float, default=17.7)
    args = ap.parse_args()
    dev = "cuda:0"
    torch.cuda.set_device(0)
    shapes = deepseek_shapes(args.tensors, int(args.gb * 1e9))
    t0 = time.perf_counter()
    src = list(random_tensors(shapes, dev).values())
    torch.cuda.synchronize()
    nbytes = np.array([t.numel() * t.element_size() for t in src], dtype=np.int64)
    offsets = np.zeros(len(src), dtype=np.int64)
    offsets[1:] = np.cumsum((nbytes + 255) // 256 * 256)[:-1]
    total = int(offsets[-1] + nbytes[-1])
    made = time.perf_counter() - t0
    print(f"{len(src)} tensors, {nbytes.sum() / 1e9:.2f} GB (made in {made:.1f} s), {torch.cuda.get_device_name(0)}")
    flat = torch.empty(total, dtype=torch.uint8, device=dev)
    timed("flat clone of the slab", lambda: flat.clone())
    timed("flat copy_ into a buffer", lambda: flat.copy_(flat.flip(0)) if False else torch.empty_like(flat).copy_(flat))

    print("python costs over every tensor:")
    timed("[t.data_ptr() for t in ts]", lambda: [t.data_ptr() for t in src])
    timed("[t.shape for t in ts] + [t.dtype ...]", lambda: ([t.shape for t in src], [t.dtype for t in src]))
    timed(
        "one pass: ptr, shape, dtype, device, contiguous",
        lambda: [(t.data_ptr(), t.shape, t.dtype, t.device, t.is_contiguous()) for t in src],
    )
    shp = [tuple(t.shape) for t in src]
    dts = [t.dtype for t in src]
    timed(
        "views by set_ on the flat storage",
        lambda: [
            torch.empty(0, dtype=d, device=dev).set_(
                flat.untyped_storage(), int(o) // torch.empty(0, dtype=d).element_size(), s
            )
            for d, s, o in zip(dts, shp, offsets.tolist(), strict=True)
        ],
        runs=3,
    )
    timed(
        "views by slicing + view(dtype).view(shape)",
        lambda: [
            flat[o : o + n].view(d).view(s)
            for o, n, d, s in zip(offsets.tolist(), nbytes.tolist(), dts, shp, strict=True)
        ],
        runs=3,
    )
    sizes = (np.diff(np.append(offsets, total))).tolist()
    timed("split_with_sizes of the flat buffer (bytes)", lambda: flat.split(sizes), runs=3)
    views = [
        flat[o : o + n].view(d).view(s) for o, n, d, s in zip(offsets.tolist(), nbytes.tolist(), dts, shp, strict=True)
    ]

    print("gather (put): separate tensors -> flat buffer")
    timed("python loop of copy_", lambda: [v.copy_(t) for v, t in zip(views, src, strict=True)], runs=3)
    timed("torch._foreach_copy_ (views prebuilt)", lambda: torch._foreach_copy_(views, src))
    ptrs = np.array([t.data_ptr() for t in src], dtype=np.uint64)
    base = flat.data_ptr()
    stream = torch.cuda.Stream(dev)
    run = batch_memcpy()
    if run is not None:

        def gather() -> None:
            with torch.cuda.stream(stream):
                run(base + offsets.astype(np.uint64), ptrs, nbytes.astype(np.uint64), stream.cuda_stream)
            stream.synchronize()

        timed("cuMemcpyBatchAsync (one call, 90k entries)", gather)
        check = torch.empty_like(flat)
        torch._foreach_copy_(views, src)
        check.copy_(flat)
        flat.zero_()
        gather()
        print(f"    bytes equal to _foreach_copy_'s: {torch.equal(check, flat)}")

        def scatter() -> None:
            with torch.cuda.stream(stream):
                run(ptrs, base + offsets.astype(np.uint64), nbytes.astype(np.uint64), stream.cuda_stream)
            stream.synchronize()

        timed("cuMemcpyBatchAsync scatter (load_into)", scatter)
        if torch.cuda.device_count() > 1:
            far = torch.empty(total, dtype=torch.uint8, device="cuda:1")
            timed("peer flat copy cuda:0 -> cuda:1", lambda: far.copy_(flat))

            def peer_scatter() -> None:
                with torch.cuda.stream(stream):
                    run(far.data_ptr() + offsets.astype(np.uint64), ptrs, nbytes.astype(np.uint64), stream.cuda_stream)
                stream.synchronize()

            timed("cuMemcpyBatchAsync gather onto cuda:1 (peer)", peer_scatter)
        sizes_np = nbytes.astype(np.uint64)
        for n in (1000, 10000):
            timed(
                f"cuMemcpyBatchAsync, first {n} entries",
                lambda n=n: (
                    run(base + offsets[:n].astype(np.uint64), ptrs[:n], sizes_np[:n], stream.cuda_stream),
                    stream.synchronize(),
                ),
            )
    tri = triton_copy()
    if tri is not None:
        dst_np = (base + offsets).astype(np.int64)
        timed("triton pointer-table copy (1 MiB pieces)", lambda: tri(dst_np, ptrs.astype(np.int64), nbytes, dev))
        check = torch.empty_like(flat)
        torch._foreach_copy_(views, src)
        check.copy_(flat)
        flat.zero_()
        tri(dst_np, ptrs.astype(np.int64), nbytes, dev)
        torch.cuda.synchronize()
        print(f"    bytes equal to _foreach_copy_'s: {torch.equal(check, flat)}")

    print("bulk fingerprint pieces over the flat buffer:")
    words = flat[: total // 2048 * 2048].view(torch.int64)
    timed("unit (256 B) sums, whole buffer", lambda: words.view(-1, 32).sum(1))
    chunk = 1 << 30

    def chunked() -> None:
        for a in range(0, words.numel(), chunk // 8):
            w = words[a : a + chunk // 8].view(-1, 32)
            u = w.sum(1)
            torch.cumsum(u, 0)
            torch.cumsum(u * torch.arange(u.numel(), device=dev), 0)

    timed("unit sums + 2 cumsums, 1 GiB chunks", chunked)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
