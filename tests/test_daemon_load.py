"""Daemon-side loads: the daemon reads checkpoints itself, only under its allowed roots."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdk
from tests.daemons import tensord


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    save_file({"w": torch.randn(300, 7), "b": torch.arange(5), "s": torch.tensor(3.0)}, root / "m.safetensors")
    return root


@pytest.fixture
def loader(start_daemon, models):
    return start_daemon("loader", env={"TENSORD_ALLOWED_ROOTS": str(models)})


def test_daemon_side_load_reads_the_file_itself(loader, models) -> None:
    path = models / "m.safetensors"
    with loader.client() as c:
        assert c.load_checkpoint(str(path), "served/m", threads=2) == 1
        got = c.get("served/m", verify=True)
        assert all(torch.equal(got[k], t) for k, t in load_file(path).items())
        assert c.info("served/m")["origin"] == f"file:{os.path.realpath(path)}"
    out = tensord("load", str(path), "--name", "served/cli", "--on-daemon", socket=loader.socket)
    assert out.returncode == 0 and out.stdout.startswith("served/cli v1"), out.stderr


def test_paths_outside_the_allowed_roots_are_refused(loader, models, tmp_path) -> None:
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.ones(3)}, outside)
    (models / "escape.safetensors").symlink_to(outside)
    with loader.client() as c:
        before = (c.ls(), c.status()["devices"])
        for path in (outside, models / "escape.safetensors", models / ".." / "elsewhere.safetensors", "/etc/passwd"):
            with pytest.raises(sdk.Unauthorized):
                c.load_checkpoint(str(path), "served/nope")
        with pytest.raises(sdk.NotFound):
            c.load_checkpoint(str(models / "missing.safetensors"), "served/nope")
        (models / "bad.safetensors").write_bytes(b"\x00" * 64)
        with pytest.raises(sdk.InvalidArgument):
            c.load_checkpoint(str(models / "bad.safetensors"), "served/nope")
        assert (c.ls(), c.status()["devices"]) == before and c.status()["reservations"] == 0


def test_daemon_side_load_is_off_by_default(daemon, models) -> None:
    with daemon.client() as c, pytest.raises(sdk.Unauthorized, match="allowed_roots"):
        c.load_checkpoint(str(models / "m.safetensors"), "served/off")
