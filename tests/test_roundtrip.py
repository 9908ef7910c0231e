"""put / get / mount / load_into round trips, bit-exact, on every dtype torch has on CPU."""

from __future__ import annotations

import pytest
import torch

import sdk
from tensord_dataplane.fingerprint import fingerprint
from tensord_dataplane.tensors import DTYPES
from tests.data import random_tensor as _random
from tests.data import same_bits as _same_bits

ALL = {
    f"{name}/{i}": _random(dtype, shape, seed=i)
    for name, dtype in DTYPES.items()
    for i, shape in enumerate([(), (0,), (7,), (3, 5, 2), (1000, 33)])
}


def test_every_dtype_round_trips_bit_exact(client: sdk.Client) -> None:
    version = client.put("every/dtype", ALL)
    assert version == 1
    got = client.get("every/dtype", verify=True)
    assert set(got) == set(ALL)
    for key, t in ALL.items():
        assert _same_bits(got[key], t), key
    with client.mount("every/dtype") as m:
        assert m.version == 1
        for key, t in ALL.items():
            assert _same_bits(m.tensors[key], t), key
    targets = {k: torch.zeros_like(t) for k, t in ALL.items()}
    assert client.load_into(targets, "every/dtype", verify=True) == 1
    for key, t in ALL.items():
        assert _same_bits(targets[key], t), key


def test_manifest_fingerprints_match_the_source(client: sdk.Client) -> None:
    tensors = {"a": torch.randn(100, 100), "b": torch.randn(7).bfloat16()}
    client.put("fp", tensors)
    with client.mount("fp") as m:
        for key, t in tensors.items():
            assert m.manifest[key].fingerprint == fingerprint(t)


def test_non_contiguous_and_views_are_accepted(client: sdk.Client) -> None:
    base = torch.randn(64, 32)
    tensors = {
        "t": base.t(),
        "slice": base[::3, 1:7],
        "expanded": torch.randn(1, 8).expand(5, 8),
        "offset_view": base.view(-1)[13:29],
    }
    client.put("views", tensors)
    got = client.get("views")
    for key, t in tensors.items():
        assert torch.equal(got[key], t), key
        assert got[key].is_contiguous()


def test_get_subset_and_unknown_tensor(client: sdk.Client) -> None:
    client.put("subset", {"a": torch.ones(3), "b": torch.zeros(2)})
    assert set(client.get("subset", names=["b"])) == {"b"}
    with pytest.raises(sdk.NotFound):
        client.get("subset", names=["nope"])


def test_get_is_a_private_copy(client: sdk.Client) -> None:
    client.put("private", {"a": torch.arange(10)})
    first = client.get("private")
    first["a"][:] = -1
    assert torch.equal(client.get("private")["a"], torch.arange(10))


def test_writes_through_a_host_mount_stay_private(client: sdk.Client) -> None:
    client.put("cow", {"a": torch.arange(1000)})
    with client.mount("cow") as m:
        m.tensors["a"][:] = 7
        with client.mount("cow") as other:
            assert torch.equal(other.tensors["a"], torch.arange(1000))
    assert torch.equal(client.get("cow")["a"], torch.arange(1000))


def test_load_into_module_gives_same_outputs(client: sdk.Client) -> None:
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    client.put("mlp", src.state_dict())
    dst = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    ptrs = {k: p.data_ptr() for k, p in dst.state_dict().items()}
    assert client.load_into(dst, "mlp") == 1
    assert {k: p.data_ptr() for k, p in dst.state_dict().items()} == ptrs  # loaded in place
    x = torch.randn(5, 16)
    assert torch.equal(src(x), dst(x))


def test_load_into_non_strict_loads_common_names(client: sdk.Client) -> None:
    client.put("partial", {"a": torch.ones(2), "b": torch.ones(3)})
    target = {"a": torch.zeros(2), "c": torch.zeros(1)}
    client.load_into(target, "partial", strict=False)
    assert torch.equal(target["a"], torch.ones(2))
    assert torch.equal(target["c"], torch.zeros(1))


def test_module_level_api_uses_tensord_socket(daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORD_SOCKET", daemon.socket)
    monkeypatch.setattr(sdk, "_default", None)
    assert sdk.put("module/api", {"x": torch.ones(4)}) == 1
    assert torch.equal(sdk.get("module/api")["x"], torch.ones(4))
    assert [s["name"] for s in sdk.ls("module/")] == ["module/api"]
    assert sdk.info("module/api")["version"] == 1
    with sdk.mount("module/api") as m:
        assert torch.equal(m.tensors["x"], torch.ones(4))
    assert sdk.delete("module/api") == 1
    sdk.default_client().close()


def test_exported_members() -> None:
    """`__all__` is the API: every public class or function of `sdk` is in it, and nothing else."""
    import inspect

    for name in sdk.__all__:
        getattr(sdk, name)  # lazy names load on first use
    public = {
        name
        for name, value in vars(sdk).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and (value.__module__ or "").startswith(("sdk", "tensord_contract", "tensord_dataplane"))
    }
    assert public == set(sdk.__all__)
    assert issubclass(sdk.NotFound, sdk.TensordError)
