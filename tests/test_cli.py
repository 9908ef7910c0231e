"""The tensord command: output, exit codes, and clear errors without tracebacks."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from tests.daemons import tensord


def _fail(out, *needles: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("tensord: error: ")
    for needle in needles:
        assert needle in out.stderr


def test_ls_info_status_rm(daemon, client) -> None:
    client.put("cli/model", {"w": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.zeros(8)})
    out = tensord("ls", socket=daemon.socket)
    assert out.returncode == 0
    assert out.stdout.splitlines()[0].split() == ["NAME", "LATEST", "VERSIONS", "TENSORS", "BYTES", "DEVICE", "FROM"]
    assert "cli/model" in out.stdout
    info = json.loads(tensord("info", "cli/model", "--json", socket=daemon.socket).stdout)
    assert info["tensors"]["w"] == {"dtype": "bfloat16", "shape": [4, 8], "nbytes": 64}
    text = tensord("info", "cli/model", socket=daemon.socket).stdout
    assert "cli/model v1" in text and "bfloat16 x1" in text and "4x8" not in text
    text = tensord("info", "cli/model", "--tensors", socket=daemon.socket).stdout
    assert "bfloat16" in text and "4x8" in text
    status = json.loads(tensord("status", "--json", socket=daemon.socket).stdout)
    assert status["devices"]["cpu"]["used"] >= 512 and status["sets"] >= 1
    text = tensord("status", socket=daemon.socket).stdout
    assert "DEVICE" in text and "\nregistry: embedded\n" in text
    out = tensord("rm", "cli/model", socket=daemon.socket)
    assert out.returncode == 0 and out.stdout.strip() == "deleted 1 version"
    assert tensord("rm", "cli/model", socket=daemon.socket).stdout.strip() == "deleted 0 versions"


def test_user_mistakes_are_one_line_errors(daemon, tmp_path) -> None:
    _fail(tensord("info", "no/such/set", socket=daemon.socket), "no set named")
    _fail(tensord("info", "Bad Name", socket=daemon.socket), "bad name")
    _fail(tensord("ls", socket=str(tmp_path / "nowhere.sock")), "cannot reach the tensord daemon")
    _fail(tensord("load", str(tmp_path / "missing.safetensors"), "--name", "x", socket=daemon.socket))
    _fail(tensord("info", "x", "--version", "-1", socket=daemon.socket), "version must be")
    out = tensord("export", "x", str(tmp_path / "x.safetensors"), "--version", "newest", socket=daemon.socket)
    assert out.returncode == 2 and "a version number or 'latest', not 'newest'" in out.stderr


def test_version_latest_by_name(daemon, client) -> None:
    client.put("cli/versions", {"w": torch.zeros(2)})
    client.put("cli/versions", {"w": torch.ones(3)})
    info = json.loads(tensord("info", "cli/versions", "--version", "latest", "--json", socket=daemon.socket).stdout)
    assert info["version"] == 2 and info["tensors"]["w"]["shape"] == [3]
    info = json.loads(tensord("info", "cli/versions", "--version", "1", "--json", socket=daemon.socket).stdout)
    assert info["version"] == 1
    assert tensord("rm", "cli/versions", "--version", "2", socket=daemon.socket).stdout.strip() == "deleted 1 version"
    assert client.info("cli/versions")["versions"] == [1]
    assert tensord("rm", "cli/versions", "--version", "latest", socket=daemon.socket).returncode == 2  # by number only
    client.delete("cli/versions")


def _corrupt_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}, good)
    raw = good.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    yield "truncated", raw[:-100]
    yield "not safetensors", b"this is not a checkpoint at all, not even close"
    yield "header past end", struct.pack("<Q", 10**9) + raw[8:]
    yield "bad json", struct.pack("<Q", hlen) + b"{" * hlen + raw[8 + hlen :]


@pytest.mark.parametrize("case", range(4))
def test_bad_checkpoints_are_refused_and_change_nothing(daemon, client, tmp_path, case) -> None:
    what, data = list(_corrupt_files(tmp_path))[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    before = (client.ls(), client.status()["devices"])
    _fail(tensord("load", str(path), "--name", "corrupt", socket=daemon.socket), str(path))
    assert (client.ls(), client.status()["devices"]) == before, what
    assert client.status()["reservations"] == 0


def test_serve_rejects_a_bad_config(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[memory]\nretention = -3\n")
    out = tensord("serve", "--config", str(bad), socket=str(tmp_path / "s.sock"))
    _fail(out, "memory.retention")
    bad.write_text("[memroy]\nretention = 1\n")
    _fail(tensord("serve", "--config", str(bad), socket=str(tmp_path / "s.sock")), "unknown key memroy.retention")


NO_TORCH = """
import sys
from tensord.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "numpy", "safetensors", "prometheus_client") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
raise SystemExit(code)
"""


@pytest.mark.parametrize(
    "argv",
    [["ls"], ["info", "cli/light"], ["info", "cli/light", "--tensors"], ["status"], ["nodes"], ["rm", "cli/gone"]],
)
def test_catalogue_commands_do_not_import_torch(daemon, client, argv) -> None:
    import subprocess
    import sys

    from tests.daemons import child_env

    client.put("cli/light", {"w": torch.ones(3)})
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv],
        env=child_env(TENSORD_SOCKET=daemon.socket),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr, out.stderr


def test_a_closed_pipe_ends_quietly(daemon, client) -> None:
    import subprocess
    import sys

    from tests.daemons import child_env

    many = {f"layer.{i:05d}.a_rather_long_parameter_name.weight": torch.zeros(2) for i in range(4000)}
    client.put("cli/many", many)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensord", "info", "cli/many", "--tensors"],
        env=child_env(TENSORD_SOCKET=daemon.socket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith("cli/many v1")  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == 141, err  # what a command killed by SIGPIPE returns
    assert err == ""
