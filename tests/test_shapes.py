"""Real model shapes on host slabs: sets of ~100,000 tensors through every operation, bit-exact,
with bulk fingerprints that catch a single corrupted byte anywhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdk
from tensord_dataplane.fingerprint import BLOCK_BYTES, fingerprint, fingerprints, slab_fingerprints
from tensord_dataplane.tensors import as_bytes
from tests.data import random_tensor

_DTYPES = [torch.bfloat16, torch.float8_e4m3fn, torch.float32, torch.int64, torch.bool, torch.float16, torch.uint8]


def _model(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`n` tensors of mixed dtypes and shapes, as separate allocations: mostly a few hundred
    bytes (scales, norms), some 0-d and empty, every 1000th about 64 KiB."""
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        dtype = _DTYPES[i % len(_DTYPES)]
        if i % 997 == 0:
            shape: tuple[int, ...] = ()
        elif i % 991 == 0:
            shape = (0, 3)
        elif i % 1000 == 1:
            shape = (128, 512)
        else:
            shape = (int(rng.integers(1, 40)), int(rng.integers(1, 9)))
        out[f"model.layers.{i // 600}.mlp.experts.{i % 600}.w"] = random_tensor(dtype, shape, seed=i)
    return out


def _flat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Every named tensor's bytes, concatenated: one comparison for a whole set."""
    parts = [as_bytes(tensors[k].cpu().contiguous()) for k in names]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


@pytest.fixture(scope="module")
def big() -> dict[str, torch.Tensor]:
    return _model(100_000)


def test_a_100k_tensor_set_through_every_operation(client: sdk.Client, big: dict[str, torch.Tensor]) -> None:
    names = list(big)
    expected = _flat(big, names)
    version = client.put("shapes/100k", big)
    info = client.info("shapes/100k")
    assert info["count"] == 100_000 and "tensors" not in info
    assert info["nbytes"] == expected.numel()

    got = client.get("shapes/100k", verify=True)
    assert (got.name, got.version) == ("shapes/100k", version)
    assert len(got) == 100_000 and list(got) == names and names[5] in got and "nope" not in got
    assert all(got[k].dtype == big[k].dtype and got[k].shape == big[k].shape for k in names[:2000])
    assert torch.equal(_flat(got, names), expected)

    with client.mount("shapes/100k") as m:
        assert m.version == version and len(m.tensors) == 100_000
        m.verify()
        assert torch.equal(_flat(m.tensors, names), expected)

    target = {k: torch.zeros_like(t) for k, t in big.items()}
    assert client.load_into(target, "shapes/100k", verify=True) == version
    assert torch.equal(_flat(target, names), expected)

    rows = client.info("shapes/100k", tensors=True)["tensors"]
    assert len(rows) == 100_000 and rows[names[1]]["shape"] == list(big[names[1]].shape)
    client.delete("shapes/100k")


def test_subsets_and_targets_in_one_buffer(client: sdk.Client) -> None:
    src = _model(5_000, seed=1)
    client.put("shapes/subset", src)
    names = list(src)
    pick = names[::7] + names[3:40] + [names[-1]]
    pick = list(dict.fromkeys(pick))
    sub = client.get("shapes/subset", names=pick, verify=True)
    assert list(sub) == pick and torch.equal(_flat(sub, pick), _flat(src, pick))

    # targets that are views of one allocation (contiguous runs merge), plus non-contiguous ones
    pool = torch.zeros(sum(t.nbytes for t in src.values()) + 64 * len(src), dtype=torch.uint8)
    target, at = {}, 0
    for k, t in src.items():
        target[k] = pool[at : at + t.nbytes].view(t.dtype).view(t.shape)
        at += t.nbytes + (64 if k.endswith("1.w") else 0)
        at = -(-at // 8) * 8  # aligned for any dtype, so mostly contiguous neighbours
    odd = names[10]
    target[odd] = torch.zeros(tuple(reversed(src[odd].shape)), dtype=src[odd].dtype).t()
    client.load_into(target, "shapes/subset", verify=True)
    assert torch.equal(_flat(target, names), _flat(src, names))
    client.delete("shapes/subset")


def test_a_corrupted_byte_anywhere_is_caught(client: sdk.Client) -> None:
    """Bytes changed in the slab after their fingerprints were taken: verify names the tensor;
    a byte changed in the padding between tensors harms nobody."""
    src = _model(20_000, seed=2)
    names = list(src)
    fps = np.array(fingerprints(list(src.values())), dtype=np.uint64)
    places = [(0, 0), (len(names) - 2, -1), (1001, 1000), (12345, 3), (19998, -1)]
    for row, byte in places:
        assert src[names[row]].nbytes > 0, names[row]
        with client.reserve(f"shapes/corrupt-{row}", {k: (_dtype(t), tuple(t.shape)) for k, t in src.items()}) as r:
            r.write_all(src)
            spec = r.manifest.spec(row)
            r.slab.base()[spec.offset + (byte % spec.nbytes)] ^= 0x10
            r.written_all(np.arange(len(names)), fps)
            version = r.commit()
        with pytest.raises(sdk.IntegrityError) as info:
            client.get(f"shapes/corrupt-{row}", verify=True)
        assert info.value.details["tensor"] == names[row] and info.value.details["version"] == version
        with client.mount(f"shapes/corrupt-{row}") as m, pytest.raises(sdk.IntegrityError):
            m.verify()
        target = {k: torch.empty_like(t) for k, t in src.items()}
        with pytest.raises(sdk.IntegrityError, match=names[row].replace(".", r"\.")):
            client.load_into(target, f"shapes/corrupt-{row}", verify=True)
        assert not torch.equal(as_bytes(client.get(f"shapes/corrupt-{row}")[names[row]]), as_bytes(src[names[row]]))
        client.delete(f"shapes/corrupt-{row}")
    # padding: the byte after a 1-byte tensor lies in padding, not in any tensor
    small = {"a": torch.ones(1, dtype=torch.uint8), "b": torch.ones(3)}
    with client.reserve("shapes/padding", {k: (_dtype(t), tuple(t.shape)) for k, t in small.items()}) as r:
        r.write_all(small)
        r.slab.base()[r.manifest.spec(0).offset + 1] ^= 0xFF
        version = r.commit()
    assert client.get("shapes/padding", verify=True)["a"].item() == 1


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


@pytest.mark.parametrize("seed", range(4))
def test_bulk_fingerprints_equal_one_at_a_time(seed: int) -> None:
    """slab_fingerprints over a slab-like buffer (with garbage padding) equals fingerprint()
    of each tensor, for sizes around every block and word boundary."""
    rng = np.random.default_rng(seed)
    sizes = np.array([0, 1, 7, 8, 9, 255, 256, 257, 511, 4096, 65536 + 3, *rng.integers(0, 3000, 40)], dtype=np.int64)
    rng.shuffle(sizes)
    aligned = (sizes + BLOCK_BYTES - 1) // BLOCK_BYTES * BLOCK_BYTES
    offsets = np.cumsum(aligned) - aligned
    buf = torch.from_numpy(rng.integers(0, 256, int(aligned.sum()) + BLOCK_BYTES, dtype=np.uint8))
    bulk = slab_fingerprints(buf, offsets, sizes)
    single = [fingerprint(buf[o : o + n]) for o, n in zip(offsets.tolist(), sizes.tolist(), strict=True)]
    assert bulk.tolist() == single
    spread = [buf[o : o + n].clone() for o, n in zip(offsets.tolist(), sizes.tolist(), strict=True)]
    assert fingerprints(spread) == single


def test_fingerprints_see_order_length_and_content() -> None:
    t = random_tensor(torch.float32, (1000,), seed=9)
    base = fingerprint(t)
    swapped = torch.cat([t[64:128], t[:64], t[128:]])  # two 256-byte blocks swapped
    assert fingerprint(swapped) != base
    assert fingerprint(t[:-1]) != base
    assert fingerprint(torch.cat([t, torch.zeros(1)])) != fingerprint(t)  # a zero appended
    flipped = t.clone()
    as_bytes(flipped)[2049] ^= 1
    assert fingerprint(flipped) != base
    assert fingerprint(torch.empty(0)) == 0


def test_a_version_seen_before_opens_without_its_manifest(client: sdk.Client, monkeypatch) -> None:
    from tensord_contract.manifest import Manifest

    client.put("shapes/cached", {"a": torch.ones(3), "b": torch.zeros(2, 2)})
    decoded: list[str] = []
    real = Manifest.from_wire

    def counting(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.append(data["name"])
        return real(data, *args, **kwargs)

    monkeypatch.setattr(Manifest, "from_wire", counting)
    client.get("shapes/cached")
    with client.mount("shapes/cached") as m:
        assert torch.equal(m.tensors["a"], torch.ones(3))
    client.load_into({"a": torch.empty(3), "b": torch.empty(2, 2)}, "shapes/cached")
    assert decoded == ["shapes/cached"]  # only the first open carried the manifest
    client.put("shapes/cached", {"a": torch.full((3,), 2.0), "b": torch.zeros(2, 2)})
    assert torch.equal(client.get("shapes/cached")["a"], torch.full((3,), 2.0))
    assert decoded == ["shapes/cached"] * 2  # a new version: its manifest came along
    client.delete("shapes/cached")


def test_views_whose_bytes_are_not_their_values(client: sdk.Client) -> None:
    """Conjugate and negative views, transposes, expanded tensors: put stores their values."""
    c = torch.randn(4, 3, dtype=torch.complex64)
    src = {
        "conj": c.conj(),  # conjugate bit: memory holds the unconjugated values
        "neg": c.conj().imag,  # negative bit
        "t": torch.arange(12.0).view(3, 4).t(),
        "expanded": torch.ones(3, 1).expand(3, 5),
        "plain": torch.arange(5),
    }
    assert src["conj"].is_conj() and src["neg"].is_neg()
    client.put("shapes/views", src)
    got = client.get("shapes/views", verify=True)
    for k, t in src.items():
        assert torch.equal(got[k], t.resolve_conj().resolve_neg()), k
    target = {k: torch.zeros_like(t.resolve_conj().resolve_neg()) for k, t in src.items()}
    client.load_into(target, "shapes/views", verify=True)
    assert all(torch.equal(target[k], t.resolve_conj().resolve_neg()) for k, t in src.items())


def test_scatter_reads_are_cut_into_balanced_calls() -> None:
    """Neighbouring tensors make one preadv call; `_balanced` cuts such calls (large tensors
    included) into calls of about `limit` bytes for the I/O threads, reading every byte into
    the same place."""
    from tensord_dataplane.host import _balanced

    def placed(calls: list[tuple[np.ndarray, int]]) -> dict[int, int]:
        where = {}
        for iov, offset in calls:
            for address, length in iov.tolist():
                for i in range(length):
                    where[offset + i] = address + i
                offset += length
        return where

    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 40))
        lengths = rng.integers(1, 200, n) * rng.choice([1, 1, 37], n)
        iov = np.stack([rng.integers(0, 1 << 40, n), lengths], 1).astype(np.int64)
        at, limit = int(rng.integers(0, 10**6)), int(rng.integers(16, 600))
        out = _balanced([(iov, at)], limit)
        assert placed(out) == placed([(iov, at)])
        assert all(int(v[:, 1].max()) <= limit for v, _ in out)
        if int(lengths.sum()) > 2 * limit:
            assert len(out) >= 2
