"""Fingerprints: a 64-bit check of each tensor's bytes, the same on CPU and GPU, computed in bulk.

Versioned: a manifest's ``fp`` names the definition its fingerprints were made with, and every
check uses that one. Definition 3 (`FINGERPRINT_VERSION`, new versions): a sum of mixed,
position-keyed words (`fingerprint_words`): catches reordered words, rows or blocks and
compensating changes. Definition 2 (`fingerprint_blocks`): the linear block sum versions
recorded before it carry; still checked, never made for a new version.

Over a slab (`slab_fingerprints`) every tensor is fingerprinted in one chunked pass. Tensors
anywhere on a GPU (`fingerprints`) are read where they lie by one kernel over a table of 1 MiB
pieces (8-byte aligned ones): shipped as PTX (`fingerprint_ptx`, nothing compiles), else
Triton's (`fingerprint_kernels`); others, or without either, are gathered into a slab-like
buffer first. Not a cryptographic hash: a check against torn, misplaced or corrupted bytes.
"""

from __future__ import annotations

import logging
import os
from operator import attrgetter
from typing import Any

import numpy as np
import torch

from tensord_contract.bulk import paused_gc
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import FINGERPRINT_VERSION, FINGERPRINT_VERSIONS
from tensord_dataplane import fingerprint_ptx
from tensord_dataplane import fingerprint_words as fw
from tensord_dataplane.fingerprint_blocks import BLOCK_BYTES, block_finish, block_part, block_slab_fingerprints
from tensord_dataplane.fingerprint_ptx import BLOCK_PIECE, WORD_PIECE
from tensord_dataplane.tensors import as_bytes

__all__ = [
    "BLOCK_BYTES",
    "FINGERPRINT_VERSION",
    "fingerprint",
    "fingerprint_finish",
    "fingerprint_part",
    "fingerprints",
    "mismatched_rows",
    "slab_fingerprints",
]
log = logging.getLogger(__name__)
_U = np.uint64
_MASK = 2**64 - 1
_IN_PLACE = 1 << 17  # bytes: CPU tensors from this size are fingerprinted where they lie, not gathered
_HOST_WINDOW = 16 << 20  # bytes: CPU tensors are gathered through one buffer of about this size


def _known(version: int) -> int:
    if version not in FINGERPRINT_VERSIONS:
        raise InvalidArgument(f"fingerprint definition {version!r:.20} unknown (known: {FINGERPRINT_VERSIONS})")
    return version


def mismatched_rows(expected: np.ndarray | None, actual: Any) -> np.ndarray:
    """The positions where fingerprints `actual` differ from `expected`, in order (empty when
    equal, or when `expected` is None: a manifest without fingerprints checks nothing)."""
    if expected is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.asarray(actual, dtype=np.uint64) != expected)


def fingerprint(t: torch.Tensor, *, version: int = FINGERPRINT_VERSION) -> int:
    """The fingerprint of one tensor's bytes, computed where it lies."""
    b = as_bytes(t.contiguous())
    if version == 3 and b.device.type == "cpu" and b.numel() >= _IN_PLACE and b.data_ptr() % 8 == 0:
        return int(_host_in_place([b])[0])  # spread over torch's threads
    return fingerprint_finish(fingerprint_part(b, 0, b.numel(), version=version), b.numel(), version=version)


def fingerprint_part(b: torch.Tensor, start: int, total: int, *, version: int = FINGERPRINT_VERSION) -> int:
    """The share of bytes ``[start, start + len(b))`` of a `total`-byte tensor (a flat uint8
    tensor `b`). `start` must be a multiple of BLOCK_BYTES, and so must the length unless the
    part ends the tensor. Add the shares (mod 2**64), then `fingerprint_finish`."""
    if _known(version) == 2:
        return block_part(b, start, total)
    n = b.numel()
    last = start + n == total
    if start % BLOCK_BYTES or (not last and n % BLOCK_BYTES) or start + n > total:
        raise InvalidArgument(f"fingerprint parts must be aligned to {BLOCK_BYTES} bytes")
    whole, rem = n // 8, n % 8
    words = _words(b[: whole * 8])
    if isinstance(words, np.ndarray):
        share = fw.run_share(words, start // 8)
    else:
        share = int(fw.segment_shares(words, _one(0), _one(whole), _one(start // 8))[0])
    if rem:  # the last word, zero-padded
        tail = int.from_bytes(b[whole * 8 :].cpu().numpy().tobytes(), "little")
        share += fw.mix(tail + (start // 8 + whole + 1) * fw.G)
    return share & _MASK


def fingerprint_finish(share: int, total: int, *, version: int = FINGERPRINT_VERSION) -> int:
    if _known(version) == 2:
        return block_finish(share, total)
    return fw.mix((share & _MASK) ^ ((total * fw.K) & _MASK))


def _one(x: int) -> np.ndarray:
    return np.array([x], dtype=np.int64)


def _words(b: torch.Tensor) -> Any:
    """A flat uint8 tensor of whole words as words: a numpy uint64 view on the CPU, an int64
    tensor elsewhere (copied when not 8-byte aligned)."""
    if b.device.type == "cpu":
        return b.detach().numpy().view(_U)
    if b.storage_offset() % 8:
        b = b.clone()
    return b.view(torch.int64)


def slab_fingerprints(
    buf: torch.Tensor, offsets: np.ndarray, sizes: np.ndarray, *, version: int = FINGERPRINT_VERSION
) -> np.ndarray:
    """The fingerprints (uint64) of tensors at byte `offsets` (multiples of 256) of a flat uint8
    buffer whose length is a multiple of 256, computed in bulk where the buffer lies."""
    if _known(version) == 2:
        return block_slab_fingerprints(buf, offsets, sizes)
    n = len(offsets)
    if not n:
        return np.zeros(0, dtype=_U)
    if buf.dim() != 1 or buf.dtype != torch.uint8 or buf.numel() % BLOCK_BYTES or buf.storage_offset() % 8:
        raise InvalidArgument("slab_fingerprints needs a flat, aligned uint8 buffer of whole 256-byte blocks")
    offsets, sizes = np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    if np.any(offsets % BLOCK_BYTES) or int((offsets + sizes).max()) > buf.numel() or int(offsets.min()) < 0:
        raise InvalidArgument("tensor offsets must be multiples of 256 inside the buffer")
    if buf.device.type == "cuda":  # one kernel over the tensors where they lie (all 8-byte aligned)
        done = _in_place(buf.device, buf.data_ptr() + offsets, sizes, version)
        if done is not None:
            return done[1]
    words = _words(buf)
    starts, whole, rem = offsets // 8, sizes // 8, sizes % 8
    try:
        zeros = np.zeros(n, dtype=np.int64)
        shares = fw.segment_shares(words, starts, whole, zeros, threads=torch.get_num_threads())
    except ValueError as exc:
        raise InvalidArgument(f"tensors overlap: {exc}") from None
    partial = np.flatnonzero(rem)
    if len(partial):
        at = starts[partial] + whole[partial]
        if isinstance(words, torch.Tensor):
            tails = words[torch.from_numpy(at).to(words.device)].cpu().numpy().view(_U)
        else:
            tails = words[at]
        with np.errstate(over="ignore"):
            shares[partial] += fw.tail_shares(tails, whole[partial], rem[partial])
    return fw.finish(shares, sizes)


def fingerprints(
    tensors: list[torch.Tensor],
    *,
    window: int = 1 << 30,
    version: int = FINGERPRINT_VERSION,
    dense: tuple[torch.device, np.ndarray, np.ndarray] | None = None,
) -> list[int]:
    """`fingerprint` of many tensors, in bulk: tensors of one device are gathered, up to
    `window` bytes at a time, into a buffer laid out like a slab, and fingerprinted together
    (on a GPU, 8-byte aligned ones are read in place by one kernel; on the host, definition 3
    reads large aligned ones in place and gathers the others through one reused buffer).
    `dense`: (device, data pointers, byte sizes) of `tensors` when the caller knows them all
    contiguous on that one device (not asked of torch again)."""
    _known(version)
    n = len(tensors)
    if n < 8:
        return [fingerprint(t, version=version) for t in tensors]
    out = np.zeros(n, dtype=_U)
    if dense is not None:
        devices, ptrs, sizes = [dense[0]], dense[1], dense[2]
        if len(ptrs) != n or len(sizes) != n:
            raise InvalidArgument("dense needs one pointer and one size per tensor")
    else:
        with paused_gc():  # one C-level map per attribute: no Python frame per tensor
            flags = list(map(torch.Tensor.is_contiguous, tensors))
            if not all(flags):
                tensors = [t if c else t.contiguous() for t, c in zip(tensors, flags, strict=True)]
            devices = list(map(attrgetter("device"), tensors))
            sizes = np.fromiter(map(attrgetter("nbytes"), tensors), dtype=np.int64, count=n)
            ptrs = np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=n)
    kinds = set(devices)
    for device in kinds:
        if len(kinds) == 1:
            rows = np.arange(n)
        else:
            rows = np.array([i for i, d in enumerate(devices) if d == device], dtype=np.int64)
        if device.type == "cuda":  # in place, one pass (8-byte aligned tensors): no gather
            done = _in_place(device, ptrs[rows], sizes[rows], version)
            if done is not None:
                out[rows[done[0]]] = done[1]
                rows = rows[~done[0]]
        buf, step = None, window
        if device.type == "cpu":
            if version == 3:  # large, aligned ones read where they lie
                big = (sizes[rows] >= _IN_PLACE) & (ptrs[rows] % 8 == 0)
                if big.any():
                    out[rows[big]] = _host_in_place([as_bytes(tensors[i]) for i in rows[big].tolist()])
                    rows = rows[~big]
            step = min(window, _HOST_WINDOW)  # a small buffer, reused: fresh pages cost more than the hash
        for idx in _groups(sizes[rows], step):
            sel = rows[idx]
            out[sel], buf = _gathered(device, ptrs[sel], sizes[sel], version, buf)
    return out.tolist()


def _host_in_place(parts: list[torch.Tensor]) -> np.ndarray:
    """Definition 3 of whole tensors given as flat, 8-byte aligned uint8 CPU tensors, read where
    they lie (no gather) over torch's thread count: their fingerprints (uint64)."""
    arrays = [b.detach().numpy() for b in parts]
    sizes = np.array([len(a) for a in arrays], dtype=np.int64)
    whole, rem = sizes // 8, sizes % 8
    shares = fw.array_shares(
        [a[: w * 8].view(_U) for a, w in zip(arrays, whole.tolist(), strict=True)], threads=torch.get_num_threads()
    )
    partial = np.flatnonzero(rem)
    if len(partial):  # each last word, zero-padded
        tails = np.array(
            [int.from_bytes(arrays[i][whole[i] * 8 :].tobytes(), "little") for i in partial.tolist()], dtype=_U
        )
        with np.errstate(over="ignore"):
            shares[partial] += fw.tail_shares(tails, whole[partial], rem[partial])
    return fw.finish(shares, sizes)


def _groups(sizes: np.ndarray, window: int) -> list[np.ndarray]:
    aligned = (sizes + BLOCK_BYTES - 1) // BLOCK_BYTES * BLOCK_BYTES
    group = (np.cumsum(aligned) - aligned) // window
    cuts = np.flatnonzero(np.diff(group)) + 1
    return np.split(np.arange(len(sizes)), cuts)


def _gathered(
    device: Any, ptrs: np.ndarray, sizes: np.ndarray, version: int, buf: torch.Tensor | None = None
) -> tuple[np.ndarray, torch.Tensor]:
    """Fingerprints of tensors copied into `buf` (or a new buffer where it is too small) laid out
    like a slab; and the buffer, for the next group."""
    from tensord_dataplane.copy import device_copy, host_copy

    aligned = (sizes + BLOCK_BYTES - 1) // BLOCK_BYTES * BLOCK_BYTES
    offsets = np.cumsum(aligned) - aligned
    need = max(int(aligned.sum()), BLOCK_BYTES)
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        device_copy(buf.data_ptr() + offsets, ptrs, sizes, device)
    else:
        host_copy(buf.data_ptr() + offsets, ptrs, sizes)
    return slab_fingerprints(buf[:need], offsets, sizes, version=version), buf


# -- in place on a GPU: one pass over the tensors where they lie -----------------------------------
_KERNELS = ("auto", "ptx", "triton")
_no_ptx: list[str] = []
_no_kernel: list[str] = []


def _in_place(device: Any, ptrs: np.ndarray, sizes: np.ndarray, version: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Fingerprints of the 8-byte aligned tensors among (`ptrs`, `sizes`) on `device`, read where
    they lie by one kernel: (which rows, their fingerprints); None where no kernel runs here.

    The PTX kernel (`fingerprint_ptx`: nothing compiles, Triton is not imported), else Triton's
    (`fingerprint_kernels`, compiled on first use), else None (the caller gathers).
    ``TENSORD_FINGERPRINT_KERNEL=ptx|triton`` allows only that one (tests, diagnosis);
    ``TENSORD_COPY_ENGINE=driver`` runs no kernel of ours."""
    engine = os.environ.get("TENSORD_FINGERPRINT_KERNEL", "auto")
    if engine not in _KERNELS:
        raise InvalidArgument(f"TENSORD_FINGERPRINT_KERNEL={engine!r}: expected auto, ptx or triton")
    if os.environ.get("TENSORD_COPY_ENGINE") == "driver":
        return None
    aligned = (ptrs & 7) == 0
    which = np.flatnonzero(aligned)
    if engine != "triton" and not _no_ptx:
        try:
            with torch.cuda.device(device):
                if fingerprint_ptx.available(torch.cuda.current_device()):
                    return aligned, in_place_fingerprints("ptx", device, ptrs[which], sizes[which], version)
        except Exception as exc:  # a launch refused, ...: Triton, else gathered copies
            _no_ptx.append(f"{type(exc).__name__}: {exc}")
            log.warning("the PTX fingerprint kernel failed (%s): falling back", _no_ptx[0])
    if engine == "ptx":
        return None
    from tensord_dataplane.fingerprint_kernels import kernels

    found = kernels()
    if found is None or _no_kernel:
        return None
    try:
        with torch.cuda.device(device):
            values = in_place_fingerprints(found, device, ptrs[which], sizes[which], version)
    except Exception as exc:  # no compiler, an unsupported GPU, ...: gather them instead
        _no_kernel.append(f"{type(exc).__name__}: {exc}")
        log.warning("fingerprints fall back to gathered copies: Triton failed (%s)", _no_kernel[0])
        return None
    return aligned, values


def piece_table(
    ptrs: np.ndarray, sizes: np.ndarray, version: int, piece: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' table over tensors at `ptrs` of `sizes` bytes: (rows, used), `used` the
    indices of the non-empty tensors, each cut into pieces of `piece` words (definition 3;
    WORD_PIECE) or blocks (definition 2; BLOCK_PIECE), at least one piece each; one int64 row per
    piece: (address, whole words, first word or block of the piece, index into `used`, bytes of
    the last partial word)."""
    used = np.flatnonzero(sizes > 0)
    nwords, rem = sizes[used] // 8, sizes[used] % 8
    step = piece or (WORD_PIECE if version == 3 else BLOCK_PIECE)
    unit = step if version == 3 else step * 32
    pieces = np.maximum(1, (nwords + unit - 1) // unit)
    t = np.repeat(np.arange(len(used)), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    k0 = (np.arange(len(t)) - first) * step
    rows = np.stack([ptrs[used][t], nwords[t], k0, t, rem[t]], axis=1).astype(np.int64).reshape(-1, 5)
    return rows, used


def in_place_fingerprints(found: Any, device: Any, ptrs: np.ndarray, sizes: np.ndarray, version: int) -> np.ndarray:
    """Run the kernel of definition `version` over tensors at 8-byte aligned `ptrs` (on
    `device`, the current device): their fingerprints (uint64). `found`: "ptx" (`fingerprint_ptx`)
    or Triton's kernels (`fingerprint_kernels.kernels()`; on the CPU under TRITON_INTERPRET=1)."""
    rows, used = piece_table(ptrs, sizes, version)
    shares = torch.zeros(max(len(used), 1), dtype=torch.int64, device=device)
    if len(rows):
        table = torch.from_numpy(rows).to(device)
        if isinstance(found, str):
            piece = WORD_PIECE if version == 3 else BLOCK_PIECE * 32
            index = torch.cuda.current_device()
            stream = torch.cuda.current_stream(index).cuda_stream
            ran = fingerprint_ptx.launch(version, table.data_ptr(), len(rows), shares.data_ptr(), piece, index, stream)
            if not ran:
                raise RuntimeError("the PTX fingerprint kernel cannot load")
        elif version == 3:
            found[0][(len(rows),)](table, shares, PIECE=WORD_PIECE, TILE=1024)
        else:
            found[1][(len(rows),)](table, shares, fw.signed(fw.G), CHUNK=BLOCK_PIECE, TILE=32)
    return finish_shares(shares.cpu().numpy()[: len(used)].view(_U), used, sizes, version)


def finish_shares(shares: np.ndarray, used: np.ndarray, sizes: np.ndarray, version: int) -> np.ndarray:
    """Fingerprints (uint64) of all tensors of `sizes` from the complete shares of the `used` ones
    (the others are empty: share 0)."""
    values = np.zeros(len(sizes), dtype=_U)
    values[used] = shares
    if version == 3:
        return fw.finish(values, sizes)
    with np.errstate(over="ignore"):
        return values ^ (sizes.astype(_U) * _U(0xFF51AFD7ED558CCD))
