"""Reads of many small pieces of a peer's memory in spans through a staging buffer
(`tensord_dataplane.spans`), against the in-memory engine, which checks every entry lies in
one registration of the peer, as Mooncake does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensord_contract.descriptors import PublishedReplica
from tensord_contract.manifest import Manifest, Table
from tensord_dataplane.published import PublishedAccess
from tensord_dataplane.spans import Spans
from tensord_dataplane.transport.memory import MemoryTransport


def test_spans_join_close_pieces_of_one_registration_only() -> None:
    src = np.array([0, 10, 20, 1000, 1010, 1020, 5000, 5010], dtype=np.int64)
    n = np.full(8, 8, dtype=np.int64)
    fence = np.array([0, 0, 0, 0, 0, 1, 2, 2])
    spans = Spans.of(src, n, fence, gap=100, limit=1 << 20)
    (w,) = spans.windows
    assert len(spans.direct) == 0
    assert w.remote.tolist() == [0, 1000, 1020, 5000]  # a gap over 100 bytes, then a new registration
    assert w.length.tolist() == [28, 18, 8, 18]
    assert w.fence.tolist() == [0, 0, 1, 2]
    assert sorted(w.pieces.tolist()) == list(range(8))
    at = dict(zip(w.pieces.tolist(), w.rel.tolist(), strict=True))
    assert [at[i] for i in range(8)] == [0, 10, 20, 28, 38, 46, 54, 64]  # spans packed in the window


def test_large_pieces_go_direct_and_spans_are_capped() -> None:
    src = np.arange(0, 4000, 40, dtype=np.int64)
    n = np.full(len(src), 40, dtype=np.int64)
    n[7] = 1000  # over the gap: read straight to its place
    spans = Spans.of(src, n, np.zeros(len(src)), gap=500, limit=400)
    assert spans.direct.tolist() == [7]
    assert all(int(w.length.max()) <= 400 for w in spans.windows)
    assert sum(len(w.pieces) for w in spans.windows) == len(src) - 1
    assert spans.size >= max(int(w.at.max() + w.length[w.at.argmax()]) for w in spans.windows)


def test_spans_that_would_not_save_entries_are_not_made() -> None:
    src = np.arange(0, 100 * 64, 64, dtype=np.int64)
    n = np.full(100, 8, dtype=np.int64)
    spans = Spans.of(src, n, np.arange(100), gap=1 << 20, limit=1 << 20)  # each its own registration
    assert spans.windows == [] and len(spans.direct) == 100


class Counting(MemoryTransport):
    def __init__(self, entry_bytes: int) -> None:
        super().__init__(entry_bytes)
        self.entries = 0

    def read(self, session, entries):  # type: ignore[no-untyped-def]
        self.entries += len(entries)
        super().read(session, entries)


@pytest.fixture
def publication():
    """300 tensors of 1 B to 2 KiB (and two of 64 KiB) in shuffled order inside three
    registered buffers of a publisher, with unpublished bytes between them."""
    rng = np.random.default_rng(3)
    buffers = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in (400_000, 400_000, 400_000)]
    publisher = MemoryTransport()
    for b in buffers:
        publisher.register(b.data_ptr(), b.numel())
    sizes = rng.integers(1, 2048, 300)
    sizes[[5, 200]] = 65536
    block = rng.integers(0, 3, 300).astype("<u4")
    offset = np.zeros(300, dtype="<u8")
    for k in range(3):  # tensors of one buffer at increasing places, gaps of 0 to 600 bytes
        rows = np.flatnonzero(block == k)
        rows = rows[rng.permutation(len(rows))]
        at = np.cumsum(sizes[rows] + rng.integers(0, 600, len(rows))) - sizes[rows]
        offset[rows] = at
        assert at[-1] + sizes[rows][-1] <= buffers[k].numel()
    names = [f"t{i}" for i in range(300)]
    padded = -(-sizes // 256) * 256
    offsets = np.cumsum(padded) - padded
    manifest = Manifest(
        "spans/set",
        1,
        Table.build(names, ["uint8"] * 300, [(int(s),) for s in sizes]),
        offsets,
        int(offsets[-1] + sizes[-1]),
    )
    replica = PublishedReplica(
        "n", "cpu", publisher.session, tuple(b.data_ptr() for b in buffers), tuple(b.numel() for b in buffers),
        block.tobytes(), offset.tobytes(), manifest.nbytes, 1, "published",
    )  # fmt: skip
    expected = [buffers[int(b)][int(o) : int(o) + int(s)] for b, o, s in zip(block, offset, sizes, strict=True)]
    return replica, manifest, expected


@pytest.mark.parametrize("entry_bytes", [0, 4096, 1 << 20])
def test_a_publication_read_in_spans_is_byte_exact(publication, entry_bytes: int) -> None:
    replica, manifest, expected = publication
    reader = Counting(entry_bytes)
    access = PublishedAccess(replica, manifest, reader)
    flat = torch.zeros(manifest.nbytes, dtype=torch.uint8)
    access.read_runs(flat, np.array([0]), np.array([0]), np.array([manifest.nbytes]))
    for t, off, want in zip(manifest.sizes, manifest.offsets, expected, strict=True):
        assert torch.equal(flat[int(off) : int(off) + int(t)], want)
    if entry_bytes:
        assert reader.entries < 300 // 4, reader.entries  # spans, and the two large tensors
    else:
        assert reader.entries >= 290  # one entry a tensor (a few neighbours merged)
    targets = [torch.zeros(int(s), dtype=torch.uint8) for s in manifest.sizes]
    ptrs = np.array([t.data_ptr() for t in targets], dtype=np.int64)
    access.read_into(ptrs, manifest.offsets.astype(np.int64), manifest.sizes.astype(np.int64), torch.device("cpu"))
    assert all(torch.equal(t, want) for t, want in zip(targets, expected, strict=True))
    kept = torch.zeros(manifest.nbytes, dtype=torch.uint8)
    reader.register(kept.data_ptr(), manifest.nbytes)
    access.read_registered(kept.data_ptr() + manifest.offsets.astype(np.int64), manifest.offsets, manifest.sizes, "cpu")
    assert torch.equal(kept, flat)
    reader.close()
