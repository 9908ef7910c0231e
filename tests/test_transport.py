"""Transport layer: descriptors, the in-memory reference, and Mooncake TE over TCP on loopback."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import itertools
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tensord_contract.errors import InvalidArgument, TransferError
from tensord_dataplane.transport import mooncake
from tensord_dataplane.transport.base import Batch, Entry, Registrations, Segment, coalesce
from tensord_dataplane.transport.memory import MemoryTransport

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]


def _load_holder():  # benchmarks/ is not a package
    spec = importlib.util.spec_from_file_location("_te_holder", ROOT / "benchmarks" / "_te_holder.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Holder


class Buf:
    """Host bytes with a stable address."""

    def __init__(self, n: int, data: bytes | None = None) -> None:
        self.raw = bytearray(data if data is not None else bytes(n))
        self.c = (ctypes.c_ubyte * n).from_buffer(self.raw)
        self.address = ctypes.addressof(self.c)

    def __del__(self) -> None:
        del self.c  # release the export before the bytearray goes


# --- descriptors -------------------------------------------------------------------------------


def test_coalesce_merges_ranges_contiguous_on_both_sides():
    entries = [
        Entry(1000, 5000, 100),
        Entry(1200, 5300, 50),  # after the next one on both sides, but given first
        Entry(1100, 5100, 100),
        Entry(1150, 9000, 0),  # empty: dropped
        Entry(1250, 9999, 10),  # local contiguous, remote not
    ]
    random.Random(7).shuffle(entries)
    assert coalesce(entries).entries() == [Entry(1000, 5000, 200), Entry(1200, 5300, 50), Entry(1250, 9999, 10)]
    assert coalesce([]).entries() == []


def test_coalesce_never_crosses_a_registration_boundary():
    """Two allocations registered separately that happen to be adjacent stay two entries."""
    regs = Registrations("s")
    regs.add(1000, 100)
    regs.add(1100, 100)
    entries = [Entry(1000, 5000, 100), Entry(1100, 5100, 100), Entry(1120, 5200, 0)]
    assert len(coalesce(entries)) == 1  # without the registrations: one range
    assert coalesce(entries, regs).entries() == [Entry(1000, 5000, 100), Entry(1100, 5100, 100)]


def test_coalesce_never_crosses_the_remote_sides_fence():
    """A publication's allocations are registered one by one on the remote side: pieces of two
    adjacent ones, contiguous on both sides, stay two entries (a merged one lies in neither:
    Mooncake's nvlink_intra refused it, "address not found")."""
    shuffled = [(1100, 5100, 100, 1), (1000, 5000, 100, 0), (1200, 5200, 50, 1)]
    local, remote, length, fence = (np.array(c, dtype=np.int64) for c in zip(*shuffled, strict=True))
    assert len(coalesce(Batch(local, remote, length))) == 1
    fenced = coalesce(Batch(local, remote, length, fence))
    assert fenced.entries() == [Entry(1000, 5000, 100), Entry(1100, 5100, 150)]
    with pytest.raises(InvalidArgument, match="fence"):
        Batch.of(Batch(local, remote, length, fence[:2]))


def test_descriptors_reject_bad_values():
    with pytest.raises(InvalidArgument):
        Entry(-1, 0, 1)
    with pytest.raises(InvalidArgument):
        Entry(0, 0, -5)
    with pytest.raises(InvalidArgument):
        Segment("s", 10, 1.5)  # type: ignore[arg-type]
    seg = Segment("s", 100, 50)
    assert seg.end == 150
    assert seg.contains(100, 50)
    assert seg.contains(149, 1)
    assert not seg.contains(99, 2)
    assert not seg.contains(140, 11)


def test_registrations_lookup_and_overlap():
    regs = Registrations("me")
    assert regs.add(1000, 100) is True
    assert regs.add(1000, 100) is False  # same range: no-op
    assert regs.add(2000, 100) is True
    assert regs.add(1100, 900) is True  # touching both neighbours is fine
    for address, length in [(1050, 10), (999, 2), (1099, 2), (500, 2000), (2099, 5)]:
        with pytest.raises(InvalidArgument):
            regs.add(address, length)
    with pytest.raises(InvalidArgument):
        regs.add(5000, 0)
    assert regs.find(1000, 100) == Segment("me", 1000, 100)
    assert regs.find(1050, 100) is None  # straddles two registrations
    assert regs.remove(1001) is None
    assert regs.remove(1000) == Segment("me", 1000, 100)
    assert regs.find(1000, 1) is None
    assert len(regs) == 2


# --- in-memory reference -------------------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = MemoryTransport(), MemoryTransport()
    yield a, b
    a.close()
    b.close()


def test_memory_read_and_write_copy_exact_bytes(pair):
    a, b = pair
    src = Buf(4096, os.urandom(4096))
    dst = Buf(4096)
    b.register(src.address, 4096)
    a.register(dst.address, 4096)
    a.read(b.session, [Entry(dst.address + 1024 * i, src.address + 1024 * (3 - i), 1024) for i in range(4)])
    for i in range(4):
        assert dst.raw[1024 * i : 1024 * (i + 1)] == src.raw[1024 * (3 - i) : 1024 * (4 - i)]

    payload = Buf(4096, os.urandom(4096))
    a.register(payload.address, 4096)
    a.write(b.session, [Entry(payload.address, src.address + 100, 3000)])
    assert src.raw[100:3100] == payload.raw[:3000]


def test_memory_rejects_ranges_outside_registered_memory(pair):
    a, b = pair
    src = Buf(4096, os.urandom(4096))
    dst = Buf(8192)
    b.register(src.address, 4096)
    a.register(dst.address, 4096)  # only the first half
    before = bytes(dst.raw)
    bad = [
        [Entry(dst.address, src.address + 4000, 200)],  # past the end of the remote range
        [Entry(dst.address, src.address - 1, 10)],  # before it
        [Entry(dst.address + 4000, src.address, 200)],  # local range not fully registered
        [Entry(dst.address, src.address, 10), Entry(dst.address + 4096, src.address, 10)],  # one bad entry
    ]
    for entries in bad:
        with pytest.raises(TransferError) as err:
            a.read(b.session, entries)
        assert err.value.details["nbytes"] > 0
    assert bytes(dst.raw) == before  # all-or-nothing: nothing moved


def test_memory_register_unregister_and_close(pair):
    a, b = pair
    src = Buf(1024, os.urandom(1024))
    dst = Buf(1024)
    a.register(dst.address, 1024)
    b.register(src.address, 1024)
    b.register(src.address, 1024)  # same range again: no-op
    with pytest.raises(InvalidArgument):
        b.register(src.address + 1, 10)
    b.unregister(src.address)
    b.unregister(src.address)  # idempotent
    with pytest.raises(TransferError):
        a.read(b.session, [Entry(dst.address, src.address, 16)])
    with pytest.raises(TransferError):
        a.read("memory:no-such-peer", [Entry(dst.address, src.address, 16)])
    a.read(b.session, [])  # an empty batch does nothing
    b.close()
    with pytest.raises(TransferError):
        a.read(b.session, [Entry(dst.address, src.address, 16)])  # a closed peer is gone
    with pytest.raises(TransferError):
        b.register(src.address, 1024)  # a closed transport refuses reuse


# --- Mooncake: configuration (no engine needed) --------------------------------------------------


def test_configure_env_sets_exactly_one_selector():
    tcp = mooncake.configure_env("tcp")
    assert tcp["MC_FORCE_TCP"] == "1"
    assert {k for k, v in tcp.items() if v is not None} == {
        "MC_FORCE_TCP",
        "MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER",  # raised: the default 1024 + 1024 breaks long batches
        "MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER",
    }
    rdma = mooncake.configure_env("rdma", ["mlx5_0", "mlx5_1"], timeout_s=2)
    assert rdma["MC_FORCE_HCA"] == "1"
    assert rdma["MC_TE_FILTERS"] == "mlx5_0,mlx5_1"
    assert rdma["MC_FORCE_TCP"] is None
    assert rdma["MC_INTRA_NVLINK"] is None
    assert rdma["MC_TRANSFER_TIMEOUT"] == "5"  # Mooncake's minimum
    assert mooncake.configure_env("nvlink_intra", timeout_s=12.5)["MC_TRANSFER_TIMEOUT"] == "13"
    assert mooncake.configure_env("nvlink_intra")["MC_INTRA_NVLINK"] == "1"
    # slabs are registered after a reader's first look at a peer: no stale descriptions
    assert mooncake.configure_env("nvlink_intra")["MC_DISABLE_METACACHE"] is None  # its mover keeps it on
    assert rdma["MC_DISABLE_METACACHE"] == "1"
    for args, kwargs in [
        (("udp",), {}),
        (("tcp", ["mlx5_0"]), {}),
        (("rdma", "mlx5_0"), {}),
        (("rdma", []), {}),
        (("rdma", ["bad name"]), {}),
        (("tcp",), {"timeout_s": 0}),
    ]:
        with pytest.raises(InvalidArgument):
            mooncake.configure_env(*args, **kwargs)


def test_auto_picks_rdma_only_when_nics_exist(monkeypatch):
    monkeypatch.setattr(mooncake, "_rdma_devices", list)
    assert mooncake.resolve_protocol("auto") == "tcp"
    assert mooncake.configure_env("auto")["MC_FORCE_TCP"] == "1"
    monkeypatch.setattr(mooncake, "_rdma_devices", lambda: ["mlx5_0"])
    assert mooncake.resolve_protocol("auto") == "rdma"


def test_missing_package_makes_backend_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "mooncake.engine", None)  # import now raises ImportError
    ok, why = mooncake.available()
    assert not ok
    assert "mooncake" in why
    before = dict(os.environ)
    with pytest.raises(TransferError, match="unavailable"):
        mooncake.MooncakeTransport()
    assert dict(os.environ) == before  # nothing was configured
    assert mooncake.available("nope")[0] is False


# --- Mooncake TE over TCP, two processes on loopback ---------------------------------------------

_ok, _why = mooncake.available("tcp")
needs_mooncake = pytest.mark.skipif(not _ok, reason=f"Mooncake TE unavailable: {_why}")

SIZE = 64 * MiB
TIMEOUT_S = 5  # MC_TRANSFER_TIMEOUT for the reader: the bound on a silent peer


def sha(t) -> str:
    return hashlib.sha256(t.numpy().data).hexdigest()


@pytest.fixture(scope="module")
def holder():
    with _load_holder()(SIZE) as h:
        yield h


@pytest.fixture(scope="module")
def reader():
    """This process's engine with a registered 64 MiB host buffer."""
    torch = pytest.importorskip("torch")
    saved = dict(os.environ)
    te = mooncake.MooncakeTransport("127.0.0.1", "tcp", timeout_s=TIMEOUT_S)
    buf = torch.zeros(SIZE, dtype=torch.uint8)
    te.register(buf.data_ptr(), SIZE)
    te.register(buf.data_ptr(), SIZE)  # twice: a no-op, not Mooncake's "overlapped" error
    yield te, buf
    te.close()
    os.environ.clear()
    os.environ.update(saved)


@needs_mooncake
def test_mooncake_batched_read_is_bit_exact(holder, reader):
    te, buf = reader
    assert te.session.startswith("127.0.0.1:")
    base, remote = buf.data_ptr(), holder.address
    # 8 chunks in reverse order: nothing coalesces, one native call with 8 entries
    chunk = SIZE // 8
    te.read(holder.session, [Entry(base + i * chunk, remote + (7 - i) * chunk, chunk) for i in range(8)])
    for i in range(8):
        assert sha(buf[i * chunk : (i + 1) * chunk]) == holder.sha256((7 - i) * chunk, chunk)
    # uneven, contiguous pieces in shuffled order: coalesced back into one entry
    cuts = sorted(random.Random(1).sample(range(1, SIZE), 11))
    bounds = [0, *cuts, SIZE]
    pieces = [Entry(base + a, remote + a, b - a) for a, b in itertools.pairwise(bounds)]
    random.Random(2).shuffle(pieces)
    buf.zero_()
    te.read(holder.session, pieces)
    assert sha(buf) == holder.sha256(0, SIZE)


@needs_mooncake
def test_mooncake_long_batch_is_split_and_peer_stays_usable(holder, reader):
    te, buf = reader
    n, size = 5000, 4096  # beyond Mooncake's default per-peer TCP queue (2048 entries)
    entries = [Entry(buf.data_ptr() + i * size, holder.address + (n - 1 - i) * size, size) for i in range(n)]
    te.read(holder.session, entries)
    remote = bytes.fromhex(holder.sha256(size * 17, size))
    assert hashlib.sha256(buf[(n - 18) * size : (n - 17) * size].numpy().data).digest() == remote
    te.read(holder.session, [Entry(buf.data_ptr(), holder.address, MiB)])


@needs_mooncake
def test_mooncake_batched_write_lands_in_peer_memory(holder, reader):
    te, buf = reader
    buf[: 16 * MiB].random_(0, 256)
    # four 4 MiB pieces to four scattered remote offsets
    offsets = [48 * MiB, 4 * MiB, 20 * MiB + 12345, 60 * MiB - 4 * MiB]
    entries = [Entry(buf.data_ptr() + i * 4 * MiB, holder.address + off, 4 * MiB) for i, off in enumerate(offsets)]
    te.write(holder.session, entries)
    for i, off in enumerate(offsets):
        assert holder.sha256(off, 4 * MiB) == sha(buf[i * 4 * MiB : (i + 1) * 4 * MiB])


@needs_mooncake
def test_mooncake_rejects_ranges_outside_registered_memory(holder, reader):
    te, buf = reader
    base = buf.data_ptr()
    cases = [
        (holder.session, [Entry(base, holder.address + SIZE - 100, 4096)]),  # past the peer's range
        (holder.session, [Entry(base, 0x10000, 4096)]),  # never registered there
        (holder.session, [Entry(base, holder.address, 4096), Entry(base + 8192, holder.address - 8, 16)]),
        (holder.session, [Entry(base + SIZE - 8, holder.address, 4096)]),  # local side: checked here
        ("127.0.0.1:1", [Entry(base, holder.address, 4096)]),  # nobody listens
    ]
    for session, entries in cases:
        start = time.monotonic()
        with pytest.raises(TransferError) as err:
            te.read(session, entries)
        assert time.monotonic() - start < 2, "an invalid range must fail at once, not time out"
        assert session in str(err.value)
        assert err.value.details["nbytes"] > 0
    with pytest.raises(TransferError, match="4096 bytes"):
        te.write(holder.session, [Entry(base, holder.address + SIZE, 4096)])
    te.read(holder.session, [Entry(base, holder.address, 4096)])  # the engine still works


@needs_mooncake
@pytest.mark.slow
def test_mooncake_silent_then_dead_peer_fails_in_bounded_time(reader):
    te, buf = reader
    with _load_holder()(MiB) as peer:
        te.read(peer.session, [Entry(buf.data_ptr(), peer.address, MiB)])  # connected
        peer.signal(signal.SIGSTOP)  # alive but silent: bounded by MC_TRANSFER_TIMEOUT
        start = time.monotonic()
        with pytest.raises(TransferError, match=peer.session):
            te.read(peer.session, [Entry(buf.data_ptr(), peer.address, MiB)])
        assert time.monotonic() - start < TIMEOUT_S + 5
        peer.signal(signal.SIGKILL)  # dead: its sockets close, the next read fails at once
        peer.proc.wait(10)
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(TransferError):
                te.read(peer.session, [Entry(buf.data_ptr(), peer.address, MiB)])
            assert time.monotonic() - start < 3


@needs_mooncake
def test_mooncake_closed_transport_refuses_use():
    torch = pytest.importorskip("torch")
    saved = dict(os.environ)
    try:
        buf = torch.zeros(4096, dtype=torch.uint8)
        with mooncake.MooncakeTransport(timeout_s=TIMEOUT_S) as te:
            te.register(buf.data_ptr(), 4096)
            with pytest.raises(InvalidArgument):
                te.register(buf.data_ptr() + 16, 16)  # overlaps
            te.unregister(buf.data_ptr())
            te.unregister(buf.data_ptr())  # idempotent
        te.close()  # idempotent
        with pytest.raises(TransferError, match="closed"):
            te.read("127.0.0.1:1", [Entry(buf.data_ptr(), 0, 16)])
        with pytest.raises(TransferError, match="closed"):
            te.register(buf.data_ptr(), 4096)
    finally:
        os.environ.clear()
        os.environ.update(saved)
