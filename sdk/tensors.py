"""torch helpers shared by the SDK and the daemon: dtype names, byte views, fingerprints."""

from __future__ import annotations

import torch

from sdk.errors import InvalidArgument
from sdk.manifest import DTYPE_SIZES

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in DTYPE_SIZES if isinstance(getattr(torch, name, None), torch.dtype)
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

_BLOCK_WORDS = 1 << 16  # int64 words per fingerprint block
BLOCK_BYTES = _BLOCK_WORDS * 8
_MASK = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # odd, as a signed int64


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} is not supported by tensord") from None


def to_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"dtype {name!r} is not available in this torch build") from None


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes (any dtype, 0-d and empty included)."""
    if not t.is_contiguous():
        raise InvalidArgument("as_bytes needs a contiguous tensor")
    nbytes = t.numel() * t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset() * t.element_size(), (nbytes,), (1,))


def view_bytes(buf: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Interpret a flat uint8 tensor (at an aligned offset) as a tensor of `dtype` and `shape`."""
    out = torch.empty(0, dtype=to_dtype(dtype), device=buf.device)
    itemsize = out.element_size()
    offset = buf.storage_offset()
    if offset % itemsize:
        raise InvalidArgument(f"byte offset {offset} is not aligned for {dtype}")
    return out.set_(buf.untyped_storage(), offset // itemsize, shape, contiguous_strides(shape))


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


def fingerprint(t: torch.Tensor) -> int:
    """A 64-bit fingerprint of a tensor's bytes, the same on CPU and GPU, computed where it lies.

    The bytes are read as int64 words in blocks of 512 KiB; each block's wrapping sum is
    weighted by an odd number that depends on the block's position, and the byte length and
    the tail bytes are mixed in. It detects any change that alters a block's word sum and
    blocks moved or swapped; it is an integrity check against torn or misplaced data, not a
    cryptographic hash. Integer sums wrap identically in any order, so devices agree.
    """
    b = as_bytes(t.contiguous())
    return fingerprint_finish(fingerprint_part(b, 0, b.numel()), b.numel())


def fingerprints(tensors: list[torch.Tensor]) -> list[int]:
    """`fingerprint` of many tensors, with one device-to-host transfer per device (not per tensor)."""
    shares = [_share(as_bytes(t.contiguous()), 0, t.numel() * t.element_size()) for t in tensors]
    values: list[int] = [0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, share in enumerate(shares):
        by_device.setdefault(share.device, []).append(i)
    for indices in by_device.values():
        for i, v in zip(indices, torch.stack([shares[i] for i in indices]).tolist(), strict=True):
            values[i] = fingerprint_finish(v, tensors[i].numel() * tensors[i].element_size())
    return values


def fingerprint_part(b: torch.Tensor, start: int, total: int) -> int:
    """The share of bytes ``[start, start + len(b))`` of a `total`-byte tensor in its fingerprint.

    For computing a fingerprint chunk by chunk: `start` must be a multiple of BLOCK_BYTES, and
    so must the chunk's length unless it is the last chunk. Add the shares, then finish.
    """
    return int(_share(b, start, total).item()) & _MASK


def _share(b: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """fingerprint_part as a 0-d int64 tensor on b's device (no synchronisation, ~3 kernels)."""
    n = b.numel()
    last = start + n == total
    if start % BLOCK_BYTES or (not last and n % BLOCK_BYTES):
        raise InvalidArgument(f"fingerprint chunks must be aligned to {BLOCK_BYTES} bytes")
    words_end = (total // 8 * 8 - start) if last else n
    if words_end and b.storage_offset() % 8:
        b = b.clone()
    words = b[:words_end].view(torch.int64)
    first, nfull = start // BLOCK_BYTES, words.numel() // _BLOCK_WORDS
    share = torch.zeros((), dtype=torch.int64, device=b.device)
    if nfull:  # each whole block's sum, weighted by its position
        sums = words[: nfull * _BLOCK_WORDS].view(nfull, _BLOCK_WORDS).sum(1)
        share = (sums * _weights(b.device, first + nfull)[first:]).sum()
    if last:  # then the partial block and the tail bytes, as the next two positions
        rest = words[nfull * _BLOCK_WORDS :]
        if rest.numel():
            share = share + rest.sum() * _weight(first + nfull)
        tail = b[words_end:]
        if tail.numel():
            shifts = 8 * torch.arange(tail.numel(), device=b.device, dtype=torch.int64)
            share = share + (tail.to(torch.int64) << shifts).sum() * _weight(first + nfull + 1)
    return share


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weight(index: int) -> int:
    return index * 2 + _GOLDEN


def _weights(device: torch.device, count: int) -> torch.Tensor:
    """Block weights 0..count-1 on `device`, from a table that grows as needed."""
    table = _WEIGHTS.get(device)
    if table is None or table.numel() < count:
        size = max(count, 2 * (table.numel() if table is not None else 4096))
        table = _WEIGHTS[device] = torch.arange(size, device=device, dtype=torch.int64) * 2 + _GOLDEN
    return table[:count]


def fingerprint_finish(shares: int, total: int) -> int:
    return ((shares & _MASK) ^ (total * 0xFF51AFD7ED558CCD)) & _MASK
