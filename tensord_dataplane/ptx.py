"""Kernels shipped as PTX text: loaded through the CUDA driver, which assembles them (no compiler
in this process, nothing imported), once per device, and launched one thread block per row of a
table in GPU memory. Used by the batched copy (`kernel`) and the fingerprints (`fingerprint_ptx`).

PTX for sm_80 runs on Ampere and later; the driver assembles it when the module loads and caches
the result per machine. Where it cannot load (no driver, no context, a PTX ISA the driver does
not know) `functions` returns None, once logged, and callers fall back.
"""

from __future__ import annotations

import ctypes
import logging
import threading

from tensord_dataplane.cuda import cudart, driver

log = logging.getLogger(__name__)
_P = ctypes.c_void_p
#: the head of every module of ours: PTX ISA 7.0 for sm_80 (Ampere) and later
HEAD = """
.version 7.0
.target sm_80
.address_size 64
"""
_GRID = (1 << 31) - 1  # blocks of one launch at most (grid x)


class Module:
    """A PTX module and the names of its entry points, loaded lazily per device."""

    def __init__(self, what: str, ptx: str, names: tuple[str, ...]) -> None:
        self.what, self.ptx, self.names = what, ptx, names
        self._lock = threading.Lock()
        self._functions: dict[int, tuple[int, ...] | None] = {}  # device -> functions, None: cannot load
        self.why: list[str] = []

    def functions(self, device: int) -> tuple[int, ...] | None:
        """The entry points (in `names` order) in the current context (that of `device`), loaded
        once; None where the module cannot load here."""
        with self._lock:
            if device in self._functions:
                return self._functions[device]
            try:
                loaded: tuple[int, ...] | None = self._load()
            except OSError as exc:
                self.why.append(str(exc))
                log.warning("the PTX %s cannot load on cuda:%d (%s): falling back", self.what, device, exc)
                loaded = None
            self._functions[device] = loaded
            return loaded

    def _load(self) -> tuple[int, ...]:
        lib = driver()
        ctx = _P()
        if lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0 and not ctx.value:
            runtime = cudart()  # binds the current device's primary context to this thread
            if runtime is not None:
                runtime.cudaFree(None)
        if lib.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
            raise OSError("no current CUDA context")
        module = _P()
        image = ctypes.create_string_buffer(self.ptx.encode())
        rc = lib.cuModuleLoadData(ctypes.byref(module), image)
        if rc != 0:
            raise OSError(f"cuModuleLoadData failed (CUresult {rc})")
        found = []
        for name in self.names:
            fn = _P()
            rc = lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode())
            if rc != 0:
                raise OSError(f"cuModuleGetFunction({name}) failed (CUresult {rc})")
            found.append(int(fn.value or 0))
        return tuple(found)

    def loaded(self) -> bool:
        """Whether the module loaded on some device of this process."""
        return any(f is not None for f in self._functions.values())


def launch_rows(
    fn: int, rows_ptr: int, row_bytes: int, count: int, args: tuple[int, ...], threads: int, stream: int
) -> int:
    """Launch `fn` with one block of `threads` threads per row of the table at `rows_ptr`
    (`count` rows of `row_bytes`), its parameters the table's address then `args` (64-bit
    each), on `stream`; as many launches as the grid limit needs. The driver's CUresult: 0 if
    all launched, else the first failure's."""
    values = [ctypes.c_uint64(v % (1 << 64)) for v in (rows_ptr, *args)]
    params = (_P * len(values))(*(ctypes.addressof(a) for a in values))
    lib = driver()
    for first in range(0, count, _GRID):
        n = min(count - first, _GRID)
        values[0].value = (rows_ptr + row_bytes * first) % (1 << 64)
        rc = lib.cuLaunchKernel(_P(fn), n, 1, 1, threads, 1, 1, 0, _P(stream), params, None)
        if rc != 0:
            return int(rc)
    return 0
