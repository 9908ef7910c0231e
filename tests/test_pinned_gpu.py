"""Host slabs and GPU tensors: put, get and load_into bit-exact through every copy path
(page-locked slab, bounce buffers, the kernel reading mapped host memory, pageable), with a
real-shape table (separate allocations, shuffled, mixed dtypes, odd sizes, one tensor larger
than a copy window); registrations kept between reads; the fallback when registration fails."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch

import sdk
from tensord_contract.errors import TransferError
from tensord_dataplane import host_dma
from tensord_dataplane import pinned as pinning
from tests.daemons import DaemonProcess

pytestmark = pytest.mark.gpu

_DTYPES = [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int64, torch.uint8, torch.float16, torch.bool]


def _tensors(count: int = 2000, seed: int = 0) -> dict[str, torch.Tensor]:
    """Separate allocations on cuda:0 in shuffled order: mostly small tensors of odd sizes in
    mixed dtypes, a few of MBs, one larger than a copy window, an empty and a 0-d one."""
    rng = np.random.default_rng(seed)
    g = torch.Generator(device="cuda:0").manual_seed(seed)
    numels = rng.integers(1, 5000, count).tolist()
    numels[:2] = [0, 1]
    big = {2: (20 << 20) + 3, 3: (9 << 20) + 1, 4: 1 << 20, 5: host_dma.WINDOW + 4099}  # bytes, uint8
    out: dict[str, torch.Tensor] = {}
    for i in rng.permutation(count).tolist():
        dtype = torch.uint8 if i in big else _DTYPES[i % len(_DTYPES)]
        size = torch.empty(0, dtype=dtype).element_size()
        n = big.get(i, numels[i])
        raw = torch.randint(0, 256, (n * size,), generator=g, device="cuda:0", dtype=torch.uint8)
        t = raw.view(dtype)
        out[f"layers.{i}.w"] = t.reshape(()) if i == 1 else t  # one 0-d tensor
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8).cpu()


def _check_all(got: Mapping[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    bad = [k for k in want if not _same(got[k], want[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def src() -> dict[str, torch.Tensor]:
    return _tensors()


@pytest.fixture
def copy_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TENSORD_HOST_COPY", request.param)
    return str(request.param)


def _put_and_read_back(client: sdk.Client, name: str, src: dict[str, torch.Tensor]) -> None:
    client.put(name, src, device="cpu")
    _check_all(client.get(name, device="cpu", verify=True), src)  # fingerprints checked on the CPU
    _check_all(client.get(name, device="cuda:0", verify=True), src)
    names = sorted(src)[::3]
    np.random.default_rng(1).shuffle(names)
    _check_all(client.get(name, device="cuda:0", names=names), {k: src[k] for k in names})
    params = {k: torch.zeros_like(src[k]) for k in np.random.default_rng(2).permutation(sorted(src)).tolist()}
    assert client.load_into(params, name, verify=True) >= 1
    _check_all(params, src)


@pytest.mark.parametrize("copy_mode", ["pinned", "bounce", "direct", "pageable"], indirect=True)
def test_put_get_load_into_are_bit_exact(daemon: DaemonProcess, src: dict[str, torch.Tensor], copy_mode: str) -> None:
    with daemon.client() as c:
        _put_and_read_back(c, f"pinned/{copy_mode}", src)


def test_a_registration_is_kept_for_the_next_read(daemon: DaemonProcess, src: dict[str, torch.Tensor]) -> None:
    calls: list[int] = []
    regs = pinning.registrations
    register = regs._register

    def counting(*a: object, **kw: object) -> pinning.Registration:
        calls.append(1)
        return register(*a, **kw)  # type: ignore[arg-type]

    regs.clear()
    regs._register = counting  # type: ignore[method-assign]
    try:
        with daemon.client() as c:
            c.put("pinned/kept", {"w": src["layers.5.w"]}, device="cpu")
            first = c.get("pinned/kept", device="cuda:0")["w"]
            if regs.failure is not None:
                pytest.skip(f"read-only registration is refused here (bounce buffers instead): {regs.failure}")
            second = c.get("pinned/kept", device="cuda:0")["w"]
            assert len(calls) == 1 and regs.kept() == 1
            assert _same(first, src["layers.5.w"]) and _same(second, src["layers.5.w"])
    finally:
        regs._register = register  # type: ignore[method-assign]
        regs.clear()
    assert regs.kept() == 0


def test_slabs_outside_the_budget_and_failed_registrations_fall_back_exactly(
    start_daemon: Callable[..., DaemonProcess], src: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    unpinned = start_daemon("n2", config="[memory]\npinned_host = 0\n")
    with unpinned.client() as c:
        before = pinning.registrations.kept()
        _put_and_read_back(c, "pinned/unpinned", src)
        assert pinning.registrations.kept() == before  # nothing was page-locked for it

    def refuse(*a: object, **kw: object) -> pinning.Registration:
        raise TransferError("cudaHostRegister of 1 bytes failed (cudaError 801)")

    monkeypatch.setattr(pinning, "register", refuse)
    monkeypatch.setattr(pinning, "registrations", pinning.Registrations(register=refuse))
    pinned_daemon = start_daemon("n3")
    with pinned_daemon.client() as c:
        _put_and_read_back(c, "pinned/refused", src)
    assert pinning.registrations.failure is not None
