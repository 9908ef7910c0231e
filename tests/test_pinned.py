"""Page-locked host slabs, the parts that need no GPU: the pinned_host budget and its config,
the descriptor flag, the kept registrations (with a registrar handed in) and the fallback
where CUDA cannot register. The copies themselves: tests/test_pinned_gpu.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tensord.config import load
from tensord.memory import Budgets, CudaBlocks, HostSlab, allocate
from tensord_contract.descriptors import HostReplica, replica_from_wire
from tensord_contract.errors import InvalidArgument, ProtocolError, TransferError
from tensord_dataplane import pinned
from tensord_dataplane.host import HostAccess
from tensord_dataplane.mapping import Mapping
from tests.daemons import DaemonProcess


def test_pinned_host_config_file_env_and_bad_values(tmp_path: Path) -> None:
    assert load(None, env={}).pinned_host is None  # auto: the cpu budget
    f = tmp_path / "t.toml"
    f.write_text('[memory]\npinned_host = "8GiB"\n')
    assert load(f, env={}).pinned_host == 8 << 30
    assert load(f, env={"TENSORD_PINNED_HOST": "0"}).pinned_host == 0
    assert load(f, env={"TENSORD_PINNED_HOST": "auto"}).pinned_host is None
    for bad in ('"lots"', "-1", "true"):
        f.write_text(f"[memory]\npinned_host = {bad}\n")
        with pytest.raises(InvalidArgument, match="pinned_host"):
            load(f, env={})
    with pytest.raises(InvalidArgument, match="TENSORD_PINNED_HOST"):
        load(None, env={"TENSORD_PINNED_HOST": "12 apples"})


def test_budget_marks_slabs_pinned_while_it_has_room_and_takes_bytes_back() -> None:
    budgets = Budgets({"cpu": 64 << 20}, {"cpu": 1 << 40})
    assert budgets.pinned.limit == 64 << 20  # auto: as much as the cpu budget
    budgets = Budgets({"cpu": 64 << 20}, {"cpu": 1 << 40}, pinned_host=3 << 20)
    blocks = CudaBlocks()
    first = allocate("cpu", 2 << 20, "a", blocks, pinned=budgets.pinned)
    second = allocate("cpu", 2 << 20, "b", blocks, pinned=budgets.pinned)
    try:
        assert isinstance(first, HostSlab) and isinstance(second, HostSlab)
        assert (first.pinned, second.pinned, budgets.pinned.used) == (True, False, 2 << 20)
        assert replica_from_wire(first.descriptor()[0]).pinned is True  # type: ignore[union-attr]
        assert replica_from_wire(second.descriptor()[0]).pinned is False  # type: ignore[union-attr]
        first.free()
        first.free()  # idempotent: the bytes go back once
        assert budgets.pinned.used == 0
        third = allocate("cpu", 3 << 20, "c", blocks, pinned=budgets.pinned)
        assert isinstance(third, HostSlab) and third.pinned
        third.free()
    finally:
        second.free()
    assert budgets.pinned.used == 0
    off = Budgets({"cpu": 64 << 20}, {"cpu": 1 << 40}, pinned_host=0)
    slab = allocate("cpu", 1 << 20, "d", blocks, pinned=off.pinned)
    assert isinstance(slab, HostSlab) and not slab.pinned
    slab.free()


def test_descriptor_pinned_flag_round_trips_and_is_checked() -> None:
    wire = HostReplica(4096, 7, True).to_wire()
    assert replica_from_wire(wire) == HostReplica(4096, 7, True)
    assert replica_from_wire({"kind": "host", "nbytes": 4096, "generation": 7}) == HostReplica(4096, 7)
    for bad in ("yes", 1, None, [True]):
        with pytest.raises(ProtocolError, match="pinned"):
            replica_from_wire({**wire, "pinned": bad})


def test_daemon_pins_within_its_budget_and_reads_stay_exact(tmp_path: Path) -> None:
    d = DaemonProcess(tmp_path, "n1", config='[memory]\npinned_host = "1MiB"\n').start()
    try:
        with d.client() as c:
            g = torch.Generator().manual_seed(3)
            sets = {n: {"w": torch.randint(0, 255, (600_000,), dtype=torch.uint8, generator=g)} for n in "abc"}
            c.put("p/a", sets["a"])
            c.put("p/b", sets["b"])  # 1.2 MB do not fit in 1 MiB: served pageable
            flags = {}
            for name in ("p/a", "p/b"):
                pin, _, slab = c._open(name, None)
                flags[name] = slab.pinned  # type: ignore[attr-defined]
                slab.close()
                c._release(pin)
            assert flags == {"p/a": True, "p/b": False}
            assert torch.equal(c.get("p/a")["w"], sets["a"]["w"])
            assert torch.equal(c.get("p/b", verify=True)["w"], sets["b"]["w"])
            c.delete("p/a")
            deadline = time.monotonic() + 30
            while True:  # the freed slab gives its bytes back: the next one is pinned again
                c.put("p/c", sets["c"])
                pin, _, slab = c._open("p/c", None)
                again = slab.pinned  # type: ignore[attr-defined]
                slab.close()
                c._release(pin)
                if again or time.monotonic() > deadline:
                    break
                c.delete("p/c")
                time.sleep(0.2)
            assert again
    finally:
        d.kill()


class _Registrar:
    """Registers nothing (no GPU here) but keeps the real mapping, and records the order."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.registered, self.unregistered = fail, 0, 0

    def register(self, fd: int, size: int, *, writable: bool) -> pinned.Registration:
        self.registered += 1
        if self.fail:
            raise TransferError("cudaHostRegister of 1 bytes failed (cudaError 1)")
        mapping = Mapping(fd, size, writable=writable)
        return pinned.Registration(mapping, mapping.address)

    def unregister(self, reg: pinned.Registration) -> None:
        assert reg.mapping.address, "unregistered after unmapping"
        self.unregistered += 1
        reg.mapping.close()


def _memfd(size: int = 1 << 20) -> int:
    fd = os.memfd_create("tensord-test")
    os.ftruncate(fd, size)
    return fd


def _registrations(fail: bool = False) -> tuple[pinned.Registrations, _Registrar]:
    r = _Registrar(fail)
    return pinned.Registrations(r.register, r.unregister), r


def test_a_registration_is_kept_for_the_next_read_and_dropped_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORD_IPC_KEEP_SECONDS", "0.3")
    regs, r = _registrations()
    fd = _memfd()
    dup = os.dup(fd)  # the daemon hands each read a new descriptor of the same file
    try:
        a = regs.acquire(fd, 1 << 20, 5)
        b = regs.acquire(dup, 1 << 20, 5)
        assert a is b and a is not None and a.users == 2 and r.registered == 1
        other = regs.acquire(fd, 1 << 20, 6)  # another generation: another slab
        assert other is not a and r.registered == 2
        for reg in (a, b, other):
            assert reg is not None
            regs.release(reg)
        assert regs.kept() == 2 and r.unregistered == 0
        deadline = time.monotonic() + 20
        while regs.kept() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert regs.kept() == 0 and r.unregistered == 2
    finally:
        os.close(fd)
        os.close(dup)


def test_a_registration_in_use_outlives_its_keep_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORD_IPC_KEEP_SECONDS", "0.1")
    regs, r = _registrations()
    fd = _memfd()
    try:
        a, b = regs.acquire(fd, 1 << 20, 1), regs.acquire(fd, 1 << 20, 1)
        assert a is not None and b is not None
        regs.release(a)
        time.sleep(0.6)
        assert regs.kept() == 1 and r.unregistered == 0  # b still reads through it
        monkeypatch.setenv("TENSORD_IPC_KEEP_SECONDS", "0")
        regs.release(b)
        assert regs.kept() == 0 and r.unregistered == 1  # keep 0: dropped at once
        regs.clear()
    finally:
        os.close(fd)


def test_a_failed_registration_falls_back_once_and_is_not_retried() -> None:
    regs, r = _registrations(fail=True)
    fd = _memfd()
    try:
        assert regs.acquire(fd, 1 << 20, 1) is None
        assert regs.acquire(fd, 1 << 20, 1) is None
        assert r.registered == 1 and regs.failure is not None and "cudaHostRegister" in regs.failure
    finally:
        os.close(fd)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback where CUDA is absent")
def test_without_cuda_registration_fails_cleanly_and_reads_take_the_pageable_path() -> None:
    fd = _memfd()
    with pytest.raises(TransferError, match="CUDA"):
        pinned.register(fd, 1 << 20, writable=False)
    regs = pinned.Registrations()
    assert regs.acquire(fd, 1 << 20, 1) is None and regs.kept() == 0
    data = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8)
    os.pwrite(fd, data.tobytes(), 0)
    slab = HostAccess(fd, 1 << 20, 1, pinned=True)
    out = torch.empty(4096, dtype=torch.uint8)
    slab.read_into(np.array([out.data_ptr()]), np.array([8192]), np.array([4096]), torch.device("cpu"))
    slab.finish()
    assert bytes(out.numpy()) == data[8192 : 8192 + 4096].tobytes()
    slab.close()


def test_host_copy_mode_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert pinned.mode() == "pinned"
    monkeypatch.setenv("TENSORD_HOST_COPY", "fast")
    with pytest.raises(InvalidArgument, match="TENSORD_HOST_COPY"):
        pinned.mode()
