"""A budget filled with eviction on and off: with `memory.eviction = "lru"` a put that does not
fit evicts unpinned versions that can come back (here: from their checkpoints), least recently
read first, and an evicted version comes back bit-exact on its next read; with "none", or when
nothing that could go would make room, the put fails with OutOfCapacity and nothing changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdk
from tests.data import random_tensor, same_bits
from tests.test_restore import wait_restored

MIB = 1 << 20


def _config(tmp_path: Path, eviction: str, budget: str = "4MiB") -> str:
    models = tmp_path / "models"
    return (
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[memory]\nbudgets = {{ cpu = "{budget}" }}\neviction = "{eviction}"\nhuge_pages = false\n'
        f'[ingest]\nallowed_roots = ["{models}"]\n'
    )


def _files(tmp_path: Path, count: int) -> list[Path]:
    """Checkpoints of 1 MiB each (one float32 tensor of random bits)."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = models / f"m{i}.safetensors"
        save_file({"w": random_tensor(torch.float32, (MIB // 4,), seed=i)}, path)
        paths.append(path)
    return paths


def _mib(fill: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((MIB // 4,), fill)}


def test_lru_evicts_the_least_recently_read_recoverable_version(start_daemon, tmp_path: Path) -> None:
    files = _files(tmp_path, 3)
    d = start_daemon("lru", config=_config(tmp_path, "lru"))
    with d.client() as c:
        for i, path in enumerate(files):
            assert c.load_checkpoint(str(path), f"file/{i}") == 1
        assert c.put("put/0", _mib(1.0)) == 1  # the 4 MiB budget is full; a put has no file: never evicted
        c.get("file/0")  # read: file/1 is now the least recently read
        with c.mount("file/2"):  # pinned: never evicted
            assert c.put("put/1", _mib(2.0)) == 1  # needs 1 MiB: file/1 goes
            status = c.status()
            assert status["evicted"] == 1 and status["devices"]["cpu"]["used"] <= 4 * MIB
            assert c.info("file/1")["evicted"] and c.info("file/1")["replicas"] == []
            assert c.info("file/1")["versions"] == [1]  # still a version of the set
            # reading it brings it back (bit-exact), evicting the least recently read other one
            assert same_bits(c.get("file/1", verify=True)["w"], load_file(files[1])["w"])
            assert [s["name"] for s in c.ls() if s["device"] is None] == ["file/0"]
            with pytest.raises(sdk.OutOfCapacity):  # only pinned and put versions are left to go
                c.put("put/2", {"w": torch.zeros(2 * MIB // 4)})
            assert c.info("file/2")["replicas"] != []
        assert torch.equal(c.get("put/0")["w"], _mib(1.0)["w"]) and torch.equal(c.get("put/1")["w"], _mib(2.0)["w"])
        assert same_bits(c.get("file/0", verify=True)["w"], load_file(files[0])["w"])
        assert c.status()["devices"]["cpu"]["used"] <= 4 * MIB

    d.kill()  # an evicted version stays evicted across a restart and still comes back
    d.start()
    with d.client() as c:
        wait_restored(c)
        evicted = [s["name"] for s in c.ls() if s["device"] is None and s["name"].startswith("file/")]
        assert len(evicted) == 1 and c.info(evicted[0])["evicted"]  # (the puts are lost: no file)
        i = int(evicted[0].split("/")[1])
        assert same_bits(c.get(evicted[0], verify=True)["w"], load_file(files[i])["w"])


def test_without_eviction_a_full_budget_refuses_and_changes_nothing(start_daemon, tmp_path: Path) -> None:
    files = _files(tmp_path, 4)
    d = start_daemon("none", config=_config(tmp_path, "none"))
    with d.client() as c:
        for i, path in enumerate(files):
            c.load_checkpoint(str(path), f"file/{i}")
        before = (c.ls(), c.status()["devices"])
        with pytest.raises(sdk.OutOfCapacity):
            c.put("put/0", _mib(1.0))
        assert (c.ls(), c.status()["devices"]) == before and c.status()["evicted"] == 0
        assert all(s["device"] == "cpu" for s in c.ls()) and c.status()["eviction"] == "none"


def test_when_eviction_cannot_make_room_nothing_is_evicted(start_daemon, tmp_path: Path) -> None:
    files = _files(tmp_path, 2)
    d = start_daemon("short", config=_config(tmp_path, "lru"))
    with d.client() as c:
        for i, path in enumerate(files):
            c.load_checkpoint(str(path), f"file/{i}")
        c.put("put/0", _mib(1.0))
        c.put("put/1", _mib(1.0))
        before = c.ls()
        with pytest.raises(sdk.OutOfCapacity):  # 3 MiB more: the two files free only 2
            c.put("big", {"w": torch.zeros(3 * MIB // 4)})
        assert c.ls() == before and c.status()["evicted"] == 0
