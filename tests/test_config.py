"""The daemon's configuration: the documented example, precedence, and bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

import sdk
from tensord.config import load, parse_size
from tests.daemons import REPO


def test_the_documented_example_loads_and_defaults_hold() -> None:
    c = load(REPO / "configs" / "tensord.toml", env={})
    assert c.socket == "/run/tensord/tensord.sock" and c.socket_mode == 0o660
    assert c.budgets == {"cpu": None} and c.retention == 0 and c.etcd_endpoints == ()
    assert c.transport_protocol == "off"  # no etcd: one node, no engine
    assert load(None, env={}) == load(REPO / "configs" / "tensord.toml", env={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "t.toml"
    f.write_text(
        '[daemon]\nsocket = "/a.sock"\n[memory]\nretention = 3\nbudgets = { cpu = "2GiB" }\n'
        '[registry]\netcd_endpoints = ["127.0.0.1:2379"]\n'
    )
    c = load(f, env={"TENSORD_SOCKET": "/b.sock", "TENSORD_CPU_BUDGET": "512MiB"})
    assert (c.socket, c.retention, c.budgets["cpu"]) == ("/b.sock", 3, 512 << 20)
    assert c.transport_protocol == "tcp"  # etcd configured: the engine is on by default
    assert c.with_overrides(socket="/c.sock", node=None).socket == "/c.sock"


@pytest.mark.parametrize(
    "text",
    [
        '[daemon]\nsocket_mode = "rw"\n',
        '[daemon]\nlisten = "nohost"\n',
        '[memory]\nbudgets = { gpu = "1GiB" }\n',
        '[memory]\nbudgets = { cpu = "lots" }\n',
        '[registry]\netcd_endpoints = ["http//x"]\n',
        "[registry]\nlease_ttl = 0\n",
        '[transport]\nprotocol = "carrier-pigeon"\n',
        '[ingest]\nallowed_roots = ["relative/dir"]\n',
        '[cache]\npull_through = "maybe"\n',
        '[daemon]\nstate_dir = "relative/state"\n',
        "[daemon]\nhello_timeout = 0\n",
        '[daemon]\nframe_timeout = "soon"\n',
        '[daemon]\nnode = "Not A Node!"\n',
        '[memory]\neviction = "fifo"\n',
        '[metrics]\nlisten = "9477"\n',
        "not toml at all [",
        "daemon = 3\n",
    ],
)
def test_bad_values_are_refused_with_their_place(tmp_path: Path, text: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(sdk.InvalidArgument, match=str(f)):
        load(f, env={})


def test_sizes() -> None:
    assert parse_size("60GiB", "x") == 60 << 30 and parse_size("1.5GB", "x") == 1_500_000_000
    assert parse_size(4096, "x") == 4096
    for bad in ("-1", "1 XB", -5, True, None):
        with pytest.raises(sdk.InvalidArgument):
            parse_size(bad, "x")


def test_state_dir_file_environment_and_systemd(tmp_path: Path) -> None:
    assert load(None, env={}).state_dir == ""  # none unless asked for
    assert load(None, env={"STATE_DIRECTORY": "/var/lib/tensord"}).state_dir == "/var/lib/tensord"
    f = tmp_path / "t.toml"
    f.write_text('[daemon]\nstate_dir = "/srv/tensord"\nhello_timeout = 5\nframe_timeout = 120\n')
    c = load(f, env={"STATE_DIRECTORY": "/var/lib/tensord"})  # the file wins over systemd's default
    assert (c.state_dir, c.hello_timeout, c.frame_timeout) == ("/srv/tensord", 5.0, 120.0)
    assert load(f, env={"TENSORD_STATE_DIR": "/tmp/s"}).state_dir == "/tmp/s"
    with pytest.raises(sdk.InvalidArgument, match="TENSORD_STATE_DIR"):
        load(None, env={"TENSORD_STATE_DIR": "state"})
