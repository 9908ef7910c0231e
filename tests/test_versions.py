"""Version numbering, latest, retention, pins, deletes and budgets."""

from __future__ import annotations

import pytest
import torch

import sdk


def _used(client: sdk.Client) -> int:
    return client.status()["devices"]["cpu"]["used"]


def test_versions_count_up_and_latest_moves_forward(client: sdk.Client) -> None:
    for i in range(1, 4):
        assert client.put("counting", {"x": torch.full((4,), float(i))}) == i
    assert torch.equal(client.get("counting")["x"], torch.full((4,), 3.0))
    assert torch.equal(client.get("counting", "latest")["x"], torch.full((4,), 3.0))
    assert torch.equal(client.get("counting", 2)["x"], torch.full((4,), 2.0))
    info = client.info("counting", 1)
    assert (info["version"], info["latest"], info["versions"]) == (1, 3, [1, 2, 3])


def test_delete_is_idempotent_and_versions_are_never_reused(client: sdk.Client) -> None:
    client.put("gone", {"x": torch.ones(1)})
    client.put("gone", {"x": torch.ones(1)})
    assert client.delete("gone", 1) == 1
    assert client.delete("gone", 1) == 0
    assert client.info("gone")["versions"] == [2]
    assert client.delete("gone") == 1
    assert client.delete("gone") == 0
    assert client.delete("never-existed") == 0
    with pytest.raises(sdk.NotFound):
        client.get("gone")
    assert client.put("gone", {"x": torch.ones(1)}) == 3


def test_latest_falls_back_when_the_newest_is_deleted(client: sdk.Client) -> None:
    client.put("fallback", {"x": torch.zeros(1)})
    client.put("fallback", {"x": torch.ones(1)})
    client.delete("fallback", 2)
    assert client.info("fallback")["version"] == 1


def test_unknown_names_and_versions(client: sdk.Client) -> None:
    client.put("known", {"x": torch.ones(1)})
    for call in (
        lambda: client.get("unknown"),
        lambda: client.get("known", 9),
        lambda: client.info("known", 9),
        lambda: client.mount("unknown"),
    ):
        with pytest.raises(sdk.NotFound):
            call()


def test_retention_keeps_newest_and_pins_survive(start_daemon) -> None:
    d = start_daemon("keep2", config="[memory]\nretention = 2\n")
    with d.client() as c:
        c.put("r", {"x": torch.full((1000,), 1.0)})
        with c.mount("r", 1) as m:
            for i in range(2, 5):
                c.put("r", {"x": torch.full((1000,), float(i))})
            assert c.info("r")["versions"] == [3, 4]
            with pytest.raises(sdk.NotFound):
                c.get("r", 1)
            assert torch.equal(m.tensors["x"], torch.full((1000,), 1.0))  # pinned, still whole
            assert c.status()["versions"] == 2 and c.status()["pins"] == 1
            assert _used(c) == 3 * 4096  # v1 (pinned), v3, v4
        assert c.status()["pins"] == 0
        assert _used(c) == 2 * 4096  # v1 freed with its last pin


def test_deleting_a_pinned_version_frees_it_after_release(client: sdk.Client) -> None:
    before = _used(client)
    client.put("pinned-delete", {"x": torch.arange(100)})
    with client.mount("pinned-delete") as m:
        assert client.delete("pinned-delete") == 1
        assert torch.equal(m.tensors["x"], torch.arange(100))
        assert _used(client) > before
    assert _used(client) == before


def test_budget_exceeded_changes_nothing(start_daemon) -> None:
    d = start_daemon("small", env={"TENSORD_CPU_BUDGET": "1MiB"})
    with d.client() as c:
        assert c.status()["devices"]["cpu"]["budget"] == 2**20
        c.put("fits", {"x": torch.zeros(150_000)})  # 600 kB
        before = (c.ls(), _used(c))
        with pytest.raises(sdk.OutOfCapacity):
            c.put("fits", {"x": torch.zeros(150_000)})
        with pytest.raises(sdk.OutOfCapacity):
            c.put("other", {"x": torch.zeros(150_000)})
        assert (c.ls(), _used(c)) == before
        assert c.status()["reservations"] == 0
        c.delete("fits")
        assert c.put("other", {"x": torch.zeros(150_000)}) == 1
