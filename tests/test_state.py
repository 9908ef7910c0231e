"""The state directory: version counters written durably, read back, locked, never guessed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import sdk
from tensord.registry.local import LocalRegistry
from tensord.state import StateDir


async def test_counters_survive_a_new_process_view(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    state.open()
    registry = LocalRegistry(state.versions)
    got = await asyncio.gather(*(registry.allocate_version("m/tp0") for _ in range(20)))
    assert sorted(got) == list(range(1, 21))
    assert await registry.allocate_version("other") == 1
    state.close()
    again = StateDir(tmp_path / "s")
    again.open()
    assert await LocalRegistry(again.versions).allocate_version("m/tp0") == 21
    assert again.versions.last("other") == 1 and again.versions.last("never") == 0
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert not list((tmp_path / "s" / "versions").glob(".*"))  # no temporary file left
    again.close()


async def test_names_share_buckets_without_losing_counts(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.open()
    names = [f"set-{i}/tp{i % 8}" for i in range(600)]  # more names than buckets
    for name in names:
        await state.versions.advance(name)
    await state.versions.advance(names[0])
    state.close()
    stored = {}
    for f in (tmp_path / "versions").glob("*.json"):
        stored.update(json.loads(f.read_text())["versions"])
    assert stored == {name: 2 if name == names[0] else 1 for name in names}


def test_one_daemon_per_directory(tmp_path: Path) -> None:
    first = StateDir(tmp_path)
    first.open()
    with pytest.raises(sdk.InvalidArgument, match="in use by another daemon"):
        StateDir(tmp_path).open()
    first.close()
    second = StateDir(tmp_path)
    second.open()
    second.close()


@pytest.mark.parametrize(
    "content",
    ["not json", '{"format": 2, "versions": {}}', '{"format": 1, "versions": {"a": -1}}', '{"format": 1}', "[]"],
)
def test_a_damaged_file_is_refused_and_named(tmp_path: Path, content: str) -> None:
    (tmp_path / "versions").mkdir()
    bad = tmp_path / "versions" / "3f.json"
    bad.write_text(content)
    with pytest.raises(sdk.InvalidArgument, match=str(bad)):
        StateDir(tmp_path).open()
    with pytest.raises(sdk.InvalidArgument, match=str(bad)):  # not "in use": the lock went back
        StateDir(tmp_path).open()
