"""Fingerprints of tensors where they lie on a GPU, shipped as PTX: nothing compiles on a
process's first put or verified read (the Triton kernels of `fingerprint_kernels` are the
fallback).

The same table as the Triton kernels (`fingerprint.in_place_fingerprints`): rows of five int64
(address, whole words, first word of the piece (definition 3) or first 256-byte block
(definition 2), tensor index, bytes of the tensor's last partial word), one thread block per
row. Its threads stride over the piece's words (coalesced: thread i reads word j0 + i, then
j0 + i + 256, ...; four words a turn, their loads issued together, then one a turn), each
summing f(j, w_j) mod 2**64, j the word's index in its tensor:
  definition 3 (`tensord_fp_words`):  mix(w + (j + 1) * G), mix = splitmix64's finaliser;
  definition 2 (`tensord_fp_blocks`): w * (2 * (j // 32) + G) (the block sum times its key,
    distributed over the block's words).
The block's sums meet by warp shuffles, then shared memory; thread 0 of the tensor's first
piece adds f(nwords, last word) for the zero-padded partial word (`rem` bytes), and adds the
piece's share to its tensor's slot with one `atom.global.add.u64`. Shares add mod 2**64, so
the order of pieces does not matter: the result is bit-identical to the CPU's.
"""

from __future__ import annotations

from tensord_contract.errors import TransferError
from tensord_dataplane import fingerprint_words as fw
from tensord_dataplane import ptx

THREADS = 256  # a multiple of 32 (the reduction sums ntid / 32 warps)
WORD_PIECE = 1 << 17  # words (1 MiB) one row of the table covers at most (definition 3)
BLOCK_PIECE = 4096  # blocks (1 MiB) one row covers at most (definition 2)
ROW_BYTES = 40


# Registers: rd5 address, rd6 nwords, rd7 first word, rd8 tensor, rd9 rem, rd10 end, rd12 j,
# rd13 stride, rd14 sum, rd16 the word; {word} leaves f(rd12, rd16) in rd17 (scratch rd18, rd19);
# {unrolled} uses rd28-rd35.
_BODY = """
.visible .entry {name}(.param .u64 p_rows, .param .u64 p_shares, .param .u64 p_piece)
{{
    .reg .pred %p<4>;
    .reg .b32 %r<16>;
    .reg .b64 %rd<40>;
    .shared .align 8 .b64 warp_sums[32];

    ld.param.u64 %rd1, [p_rows];
    cvta.to.global.u64 %rd1, %rd1;
    ld.param.u64 %rd2, [p_shares];
    cvta.to.global.u64 %rd2, %rd2;
    ld.param.u64 %rd3, [p_piece];
    mov.u32 %r1, %ctaid.x;
    mul.wide.u32 %rd4, %r1, 40;
    add.s64 %rd4, %rd1, %rd4;
    ld.global.u64 %rd5, [%rd4];
    cvta.to.global.u64 %rd5, %rd5;
    ld.global.u64 %rd6, [%rd4+8];
    ld.global.u64 %rd7, [%rd4+16];
    ld.global.u64 %rd8, [%rd4+24];
    ld.global.u64 %rd9, [%rd4+32];{start}
    add.s64 %rd10, %rd7, %rd3;
    min.u64 %rd10, %rd10, %rd6;
    mov.u32 %r2, %tid.x;
    cvt.u64.u32 %rd11, %r2;
    add.s64 %rd12, %rd7, %rd11;
    mov.u32 %r3, %ntid.x;
    cvt.u64.u32 %rd13, %r3;
    mov.u64 %rd14, 0;{unrolled}
$L_loop:
    setp.ge.u64 %p1, %rd12, %rd10;
    @%p1 bra $L_reduce;
    shl.b64 %rd15, %rd12, 3;
    add.s64 %rd15, %rd5, %rd15;
    ld.global.u64 %rd16, [%rd15];{word}
    add.s64 %rd14, %rd14, %rd17;
    add.s64 %rd12, %rd12, %rd13;
    bra.uni $L_loop;
$L_reduce:{shuffles}
    and.b32 %r8, %r2, 31;
    setp.ne.u32 %p2, %r8, 0;
    @%p2 bra $L_written;
    shr.u32 %r9, %r2, 5;
    mul.wide.u32 %rd20, %r9, 8;
    mov.u64 %rd21, warp_sums;
    add.s64 %rd21, %rd21, %rd20;
    st.shared.u64 [%rd21], %rd14;
$L_written:
    bar.sync 0;
    setp.ne.u32 %p2, %r2, 0;
    @%p2 bra $L_done;
    shr.u32 %r10, %r3, 5;
    mov.u32 %r11, 0;
    mov.u64 %rd14, 0;
    mov.u64 %rd21, warp_sums;
$L_sum:
    setp.ge.u32 %p1, %r11, %r10;
    @%p1 bra $L_tail;
    ld.shared.u64 %rd22, [%rd21];
    add.s64 %rd14, %rd14, %rd22;
    add.s64 %rd21, %rd21, 8;
    add.u32 %r11, %r11, 1;
    bra.uni $L_sum;
$L_tail:
    setp.ne.u64 %p1, %rd7, 0;
    setp.eq.u64 %p3, %rd9, 0;
    or.pred %p1, %p1, %p3;
    @%p1 bra $L_add;
    shl.b64 %rd15, %rd6, 3;
    add.s64 %rd15, %rd5, %rd15;
    mov.u64 %rd16, 0;
    mov.u64 %rd23, 0;
$L_byte:
    setp.ge.u64 %p1, %rd23, %rd9;
    @%p1 bra $L_last;
    add.s64 %rd24, %rd15, %rd23;
    ld.global.u8 %r12, [%rd24];
    and.b32 %r12, %r12, 255;
    cvt.u64.u32 %rd25, %r12;
    cvt.u32.u64 %r13, %rd23;
    shl.b32 %r13, %r13, 3;
    shl.b64 %rd25, %rd25, %r13;
    or.b64 %rd16, %rd16, %rd25;
    add.s64 %rd23, %rd23, 1;
    bra.uni $L_byte;
$L_last:
    mov.u64 %rd12, %rd6;{word}
    add.s64 %rd14, %rd14, %rd17;
$L_add:
    shl.b64 %rd26, %rd8, 3;
    add.s64 %rd26, %rd2, %rd26;
    atom.global.add.u64 %rd27, [%rd26], %rd14;
$L_done:
    ret;
}}
"""

# Each lane adds the sum of the lane `offset` above it (both 32-bit halves moved); after
# offsets 16..1 lane 0 holds its warp's sum (lanes past the end read their own: not used).
_SHUFFLE = """
    mov.b64 {{%r4, %r5}}, %rd14;
    shfl.sync.down.b32 %r6, %r4, {offset}, 31, 0xffffffff;
    shfl.sync.down.b32 %r7, %r5, {offset}, 31, 0xffffffff;
    mov.b64 %rd20, {{%r6, %r7}};
    add.s64 %rd14, %rd14, %rd20;"""

_WORDS = f"""
    add.s64 %rd18, %rd12, 1;
    mul.lo.u64 %rd18, %rd18, {fw.G:#x}U;
    add.s64 %rd17, %rd16, %rd18;
    shr.u64 %rd19, %rd17, 30;
    xor.b64 %rd17, %rd17, %rd19;
    mul.lo.u64 %rd17, %rd17, {fw.M1:#x}U;
    shr.u64 %rd19, %rd17, 27;
    xor.b64 %rd17, %rd17, %rd19;
    mul.lo.u64 %rd17, %rd17, {fw.M2:#x}U;
    shr.u64 %rd19, %rd17, 31;
    xor.b64 %rd17, %rd17, %rd19;"""

_BLOCKS = f"""
    shr.u64 %rd18, %rd12, 5;
    shl.b64 %rd18, %rd18, 1;
    add.s64 %rd18, %rd18, {fw.G:#x}U;
    mul.lo.u64 %rd17, %rd16, %rd18;"""

# Four words a turn while j + 3 * stride < end (their loads issued together), then the loop of
# one word a turn above finishes the piece; rd28 = 3 * stride, rd29 = stride in bytes.
_UNROLLED = """
    mul.lo.u64 %rd28, %rd13, 3;
    shl.b64 %rd29, %rd13, 3;
$L_four:
    add.s64 %rd30, %rd12, %rd28;
    setp.ge.u64 %p1, %rd30, %rd10;
    @%p1 bra $L_loop;
    shl.b64 %rd15, %rd12, 3;
    add.s64 %rd15, %rd5, %rd15;
    ld.global.u64 %rd32, [%rd15];
    add.s64 %rd15, %rd15, %rd29;
    ld.global.u64 %rd33, [%rd15];
    add.s64 %rd15, %rd15, %rd29;
    ld.global.u64 %rd34, [%rd15];
    add.s64 %rd15, %rd15, %rd29;
    ld.global.u64 %rd35, [%rd15];{turns}
    bra.uni $L_four;"""

_TURN = """
    mov.u64 %rd16, %rd{reg};{word}
    add.s64 %rd14, %rd14, %rd17;
    add.s64 %rd12, %rd12, %rd13;"""


def _unrolled(word: str) -> str:
    return _UNROLLED.replace("{turns}", "".join(_TURN.format(reg=r, word=word) for r in (32, 33, 34, 35)))


_SHUFFLES = "".join(_SHUFFLE.format(offset=o) for o in (16, 8, 4, 2, 1))
_BLOCK_START = """
    shl.b64 %rd7, %rd7, 5;"""

PTX = (
    ptx.HEAD
    + _BODY.format(name="tensord_fp_words", start="", word=_WORDS, shuffles=_SHUFFLES, unrolled=_unrolled(_WORDS))
    + _BODY.format(
        name="tensord_fp_blocks", start=_BLOCK_START, word=_BLOCKS, shuffles=_SHUFFLES, unrolled=_unrolled(_BLOCKS)
    )
)

_module = ptx.Module("fingerprint kernel", PTX, ("tensord_fp_words", "tensord_fp_blocks"))


def available(device: int) -> bool:
    """Whether the kernels load on `device` (which must be current)."""
    return _module.functions(device) is not None


def launch(version: int, rows_ptr: int, count: int, shares_ptr: int, piece: int, device: int, stream: int) -> bool:
    """Add the shares of `count` rows of the table at `rows_ptr` to the int64 slots at
    `shares_ptr` (GPU memory, current device `device`, on `stream`); `piece`: words a row covers
    at most. False where the kernels cannot load here (nothing was launched)."""
    functions = _module.functions(device)
    if functions is None:
        return False
    if not count:
        return True
    fn = functions[0] if version == 3 else functions[1]
    rc = ptx.launch_rows(fn, rows_ptr, ROW_BYTES, count, (shares_ptr, piece), THREADS, stream)
    if rc != 0:
        raise TransferError(f"cuLaunchKernel of the fingerprint kernel failed (CUresult {rc})")
    return True


def loaded() -> bool:
    """Whether the kernels loaded on some device of this process."""
    return _module.loaded()
