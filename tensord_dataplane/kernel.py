"""The batched copy kernel, shipped as PTX: no Triton, no compiler on a process's first copy.

Two kernels over a table of rows (dst, src, units) in GPU memory, one thread block per row
(rows are pieces of at most `copy.PIECE` bytes): `tensord_copy16` moves 16-byte units
(addresses and length multiples of 16), `tensord_copy1` single bytes. Each adds a base to
every dst and src, so a table of offsets prepared once serves every slab it is run against.
Loads and stores use generic addresses: device, peer and mapped host memory all work.

The PTX targets sm_80 (Ampere and later); the driver assembles it when the module loads, once
per device (ptxas took 33 ms for it on sm_90; the driver caches the result per machine). `launch` returns False
where it cannot be loaded (no driver, a PTX ISA the driver does not know), and the caller
falls back (`tensord_dataplane.copy`). Loading and launching: `tensord_dataplane.ptx`.
"""

from __future__ import annotations

from tensord_contract.errors import TransferError
from tensord_dataplane import ptx

THREADS = 256


_BODY = """
.visible .entry {name}(.param .u64 p_rows, .param .u64 p_dst_base, .param .u64 p_src_base)
{{
    .reg .pred %p;
    .reg .b16 %rs<2>;
    .reg .b32 %r<4>;
    .reg .b64 %rd<16>;

    ld.param.u64 %rd1, [p_rows];
    cvta.to.global.u64 %rd1, %rd1;
    ld.param.u64 %rd2, [p_dst_base];
    ld.param.u64 %rd3, [p_src_base];
    mov.u32 %r1, %ctaid.x;
    mul.wide.u32 %rd4, %r1, 24;
    add.s64 %rd4, %rd1, %rd4;
    ld.global.u64 %rd5, [%rd4];
    ld.global.u64 %rd6, [%rd4+8];
    ld.global.u64 %rd7, [%rd4+16];
    add.s64 %rd5, %rd5, %rd2;
    add.s64 %rd6, %rd6, %rd3;
    mov.u32 %r2, %tid.x;
    cvt.u64.u32 %rd8, %r2;
    mov.u32 %r3, %ntid.x;
    cvt.u64.u32 %rd9, %r3;
$L_loop:
    setp.ge.u64 %p, %rd8, %rd7;
    @%p bra $L_done;
{move}
    add.s64 %rd8, %rd8, %rd9;
    bra.uni $L_loop;
$L_done:
    ret;
}}
"""

_MOVE16 = """
    shl.b64 %rd10, %rd8, 4;
    add.s64 %rd11, %rd6, %rd10;
    ld.v2.u64 {%rd12, %rd13}, [%rd11];
    add.s64 %rd14, %rd5, %rd10;
    st.v2.u64 [%rd14], {%rd12, %rd13};"""

_MOVE1 = """
    add.s64 %rd11, %rd6, %rd8;
    ld.u8 %rs1, [%rd11];
    add.s64 %rd14, %rd5, %rd8;
    st.u8 [%rd14], %rs1;"""

PTX = ptx.HEAD + _BODY.format(name="tensord_copy16", move=_MOVE16) + _BODY.format(name="tensord_copy1", move=_MOVE1)

_module = ptx.Module("copy kernel", PTX, ("tensord_copy16", "tensord_copy1"))


def _load(device: int) -> tuple[int, ...] | None:
    """The two kernels in the current context (that of `device`), loaded once."""
    return _module.functions(device)


def available(device: int) -> bool:
    """Whether the kernels load on `device` (which must be current)."""
    return _load(device) is not None


def launch(wide: bool, rows_ptr: int, count: int, dst_base: int, src_base: int, device: int, stream: int) -> bool:
    """Run `count` rows of the table at `rows_ptr` (GPU memory) on `stream` of `device` (the
    current device); False where the kernels cannot load here (nothing was launched)."""
    functions = _load(device)
    if functions is None:
        return False
    if not count:
        return True
    fn = functions[0] if wide else functions[1]
    rc = ptx.launch_rows(fn, rows_ptr, 24, count, (dst_base, src_base), THREADS, stream)
    if rc != 0:
        raise TransferError(f"cuLaunchKernel of the copy kernel failed (CUresult {rc})")
    return True


def loaded() -> bool:
    """Whether the kernels loaded on some device of this process."""
    return _module.loaded()
