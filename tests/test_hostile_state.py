"""A daemon restarted over a damaged state directory's table files (`held/tables/`): it starts,
leaves the versions whose table is bad unrestored (logged), restores the others bit-exact and
takes new versions; it never reads a huge file into memory, never follows a link out of the
state directory, and never removes what lies outside it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import sdk
from tensord import durable, held_tables, state
from tensord.state import Catalogue, VersionCounters
from tensord_contract.manifest import Manifest, table_of
from tensord_contract.names import MAX_VERSION
from tests.data import random_tensor, same_bits
from tests.test_restore import wait_restored

NAMES = ("t/huge", "t/garbage", "t/fifo", "t/link", "t/dir", "t/other", "t/good")


def _config(tmp_path: Path) -> str:
    return f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[ingest]\nallowed_roots = ["{tmp_path / "models"}"]\n'


def _loaded(d, tmp_path: Path, names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Each name a checkpoint of its own layout (one table file each), loaded by the daemon."""
    models = tmp_path / "models"
    models.mkdir()
    want = {}
    with d.client() as c:
        for i, name in enumerate(names):
            path = models / f"{i}.safetensors"
            save_file({f"w{j}": random_tensor(torch.float32, (3, j + 1), seed=i * 10 + j) for j in range(i + 1)}, path)
            want[name] = load_file(path)
            assert c.load_checkpoint(str(path), name) == 1
    return want


def _table_file(state: Path, name: str) -> Path:
    record = msgpack.unpackb((state / "held" / Catalogue.filename(name, 1)).read_bytes())
    return state / "held" / "tables" / f"{record['manifest']['table']}.tbl"


def _peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_damaged_table_files_leave_their_versions_out_and_the_rest_served(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("tables", config=_config(tmp_path))
    want = _loaded(d, tmp_path, NAMES)
    d.kill()
    state, outside = tmp_path / "state", tmp_path / "outside"
    outside.mkdir()
    files = {name: _table_file(state, name) for name in NAMES}
    with open(files["t/huge"], "r+b") as f:
        f.truncate(2 << 30)  # sparse: costs no disk, 2 GiB of memory if read
    files["t/garbage"].write_bytes(msgpack.packb({"count": 1, "names": [[[[1]]]]}))
    files["t/fifo"].unlink()
    os.mkfifo(files["t/fifo"])
    shutil.move(files["t/link"], outside / files["t/link"].name)  # a valid table, through a link
    files["t/link"].symlink_to(outside / files["t/link"].name)
    files["t/dir"].unlink()
    files["t/dir"].mkdir()
    record = state / "held" / Catalogue.filename("t/other", 1)  # names another set's table (more tensors)
    data = msgpack.unpackb(record.read_bytes())
    data["manifest"]["table"] = files["t/good"].stem
    record.write_bytes(msgpack.packb(data))

    t0 = time.monotonic()
    d.start(timeout=30)
    with d.client() as c:
        restore = wait_restored(c)
        assert time.monotonic() - t0 < 20
        assert [s["name"] for s in c.ls()] == ["t/good"]
        assert (restore["restored"], restore["lost"]) == (1, 0)
        got = c.get("t/good")
        assert set(got) == set(want["t/good"]) and all(same_bits(got[k], want["t/good"][k]) for k in got)
        for i, name in enumerate(NAMES[:-1]):  # their numbers are not reused
            path = str(tmp_path / "models" / f"{i}.safetensors")
            if name == "t/dir":  # a directory stands where its table file would be written
                with pytest.raises(sdk.Unavailable, match="cannot record t/dir v2"):
                    c.load_checkpoint(path, name)
                continue
            assert c.load_checkpoint(path, name) == 2
        assert sorted(s["name"] for s in c.ls()) == sorted(set(NAMES) - {"t/dir"})
    assert _peak_rss(d.pid) < 1 << 30, "a huge table file was read into memory"
    assert (outside / files["t/link"].name).exists()
    log = d.log.read_text()
    assert "Traceback" not in log
    for name in NAMES[:-2]:
        assert f"table file {files[name]}" in log, name
    assert "the record of t/other v1 holds a bad manifest" in log
    assert "larger than any such state file" in log


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_tables_directory_that_is_a_link_or_a_file_is_not_followed(start_daemon, tmp_path: Path, kind: str) -> None:
    """A link's target keeps every file, even ones no record uses (the daemon removes unused
    table files of its own directory); the daemon replaces the entry with an empty directory
    and records new versions there."""
    d = start_daemon("tablesdir", config=_config(tmp_path))
    want = _loaded(d, tmp_path, ("t/a", "t/b"))
    d.kill()
    tables, elsewhere = tmp_path / "state" / "held" / "tables", tmp_path / "elsewhere"
    shutil.copytree(tables, elsewhere)
    (elsewhere / f"{'0' * 64}.tbl").write_bytes(b"not the daemon's")
    before = sorted(p.name for p in elsewhere.iterdir())
    shutil.rmtree(tables)
    if kind == "link":
        tables.symlink_to(elsewhere)
    else:
        tables.write_bytes(b"junk")
    d.start(timeout=30)
    with d.client() as c:
        wait_restored(c)
        assert c.ls() == []  # their tables are not read through the link
        assert c.load_checkpoint(str(tmp_path / "models" / "0.safetensors"), "t/a") == 2
        got = c.get("t/a")
        assert all(same_bits(got[k], want["t/a"][k]) for k in want["t/a"])
    assert sorted(p.name for p in elsewhere.iterdir()) == before
    assert tables.is_dir() and not tables.is_symlink() and len(list(tables.iterdir())) == 1
    assert f"{tables} is {'a symbolic link' if kind == 'link' else 'not a directory'}" in d.log.read_text()
    d.kill()
    d.start(timeout=30)
    with d.client() as c:
        assert wait_restored(c)["restored"] == 2  # v1 too: its table (the same) is recorded again
        assert c.info("t/a")["versions"] == [1, 2] and [s["name"] for s in c.ls()] == ["t/a"]


@pytest.mark.parametrize("where", ["table", "record"])
@pytest.mark.parametrize("err", [errno.EACCES, errno.EIO, errno.EMFILE])
def test_a_state_file_unreadable_for_now_removes_no_table_file(tmp_path: Path, monkeypatch, where, err) -> None:
    """A table file (or a record, whose table is then unknown) that cannot be read at load for
    a reason that may pass (permissions, I/O, descriptors) leaves its record unrestored this
    time, and every table file in place: once it reads again, the record comes back."""
    cat = Catalogue(tmp_path)
    cat.load()
    for name in ("a/one", "a/two"):
        table = table_of({name: ("float32", (4,))})
        m = Manifest(name, 0, table, *table.layout()).committed(1, np.zeros(1, np.uint64), 1.0, 3)
        asyncio.run(cat.note(m, "cpu", "s", evicted=False, with_manifest=True))
    tables = sorted((tmp_path / "tables").iterdir())
    record = tmp_path / Catalogue.filename("a/one", 1)
    key = msgpack.unpackb(record.read_bytes())["manifest"]["table"]
    blocked = record if where == "record" else tmp_path / "tables" / f"{key}.tbl"
    real = durable.read_file

    def failing(path: Path, limit: int | None = None) -> bytes:
        if Path(path) == blocked:
            raise OSError(err, os.strerror(err))
        return real(path, limit)

    monkeypatch.setattr(held_tables, "read_file", failing)
    monkeypatch.setattr(state, "read_file", failing)
    back = Catalogue(tmp_path)
    back.load()
    assert back.get("a/one", 1) is None and back.get("a/two", 1) is not None
    assert sorted((tmp_path / "tables").iterdir()) == tables
    monkeypatch.undo()
    again = Catalogue(tmp_path)
    again.load()
    assert again.get("a/one", 1) is not None and again.get("a/two", 1) is not None


def test_version_counters_stop_at_the_largest_version_and_refuse_beyond_it(start_daemon, tmp_path: Path) -> None:
    """A counter at 2**63-2 hands out 2**63-1, the last version every reader decodes; the next
    put is OutOfCapacity and changes nothing. A counter past 2**63-1 stops the start, naming
    its file (as any damaged counter does)."""
    d = start_daemon("counters", config=_config(tmp_path))
    with d.client() as c:
        assert c.put("c/max", {"x": torch.ones(2)}) == 1
    d.kill()
    bucket = tmp_path / "state" / "versions" / f"{VersionCounters.bucket('c/max')}.json"
    data = json.loads(bucket.read_text())
    data["versions"]["c/max"] = MAX_VERSION - 1
    bucket.write_text(json.dumps(data))
    d.start(timeout=30)
    with d.client() as c:
        assert c.put("c/max", {"x": torch.full((2,), 3.0)}) == MAX_VERSION
        used = c.status()["devices"]["cpu"]["used"]
        with pytest.raises(sdk.OutOfCapacity, match="every version"):
            c.put("c/max", {"x": torch.ones(2)})
        assert c.info("c/max")["versions"] == [1, MAX_VERSION]
        assert [s["latest"] for s in c.ls()] == [MAX_VERSION]
        assert (c.status()["devices"]["cpu"]["used"], c.status()["reservations"]) == (used, 0)
        assert torch.equal(c.get("c/max")["x"], torch.full((2,), 3.0))
    d.kill()
    data["versions"]["c/max"] = MAX_VERSION + 1
    bucket.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match=f"state file {bucket} holds a bad counter"):
        d.start(timeout=30)


def test_links_planted_at_temporary_names_are_never_written_through(start_daemon, tmp_path: Path) -> None:
    """Every state write goes to `.NAME.tmp` first: a link planted there (to a file outside the
    state directory) is replaced, not followed; the file it points to keeps its bytes and the
    record, table and counter written are regular files that load again."""
    d = start_daemon("planted", config=_config(tmp_path))
    with d.client() as c:
        assert c.put("p/first", {"x": torch.ones(2)}) == 1  # the directories exist
    state, victim = tmp_path / "state", tmp_path / "victim"
    victim.write_bytes(b"not the daemon's")
    digest = table_of({"x": ("float32", (3,))}).digest.hex()
    written = [
        state / "held" / Catalogue.filename("p/link", 1),
        state / "held" / "tables" / f"{digest}.tbl",
        state / "versions" / f"{VersionCounters.bucket('p/link')}.json",
    ]
    for path in written:
        (path.parent / f".{path.name}.tmp").symlink_to(victim)
    with d.client() as c:
        assert c.put("p/link", {"x": torch.ones(3)}) == 1
    assert victim.read_bytes() == b"not the daemon's"
    assert all(p.is_file() and not p.is_symlink() for p in written)
    d.kill()
    d.start(timeout=30)
    with d.client() as c:
        assert c.info("p/link")["versions"] == [1]  # its record and table read back
        assert c.put("p/link", {"x": torch.ones(3)}) == 2


def test_held_or_versions_as_a_link_is_never_followed(start_daemon, tmp_path: Path) -> None:
    """`held` a link to a copy of itself (plus a stray table file): not read, not written,
    nothing in the copy removed; the daemon records anew in a real directory. `versions` a
    link: the start stops naming it (without its counters, versions would be reused)."""
    d = start_daemon("heldlink", config=_config(tmp_path))
    _loaded(d, tmp_path, ("h/a",))
    d.kill()
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere"
    shutil.copytree(state / "held", elsewhere)
    (elsewhere / "tables" / f"{'0' * 64}.tbl").write_bytes(b"not the daemon's")
    before = sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*"))
    shutil.rmtree(state / "held")
    (state / "held").symlink_to(elsewhere)
    d.start(timeout=30)
    with d.client() as c:
        wait_restored(c)
        assert c.ls() == []
        assert c.load_checkpoint(str(tmp_path / "models" / "0.safetensors"), "h/a") == 2  # counters kept
    assert sorted(str(p.relative_to(elsewhere)) for p in elsewhere.rglob("*")) == before
    assert (state / "held").is_dir() and not (state / "held").is_symlink()
    assert (state / "held" / Catalogue.filename("h/a", 2)).is_file()
    assert f"{state / 'held'} is a symbolic link" in d.log.read_text()
    d.kill()
    shutil.move(state / "versions", tmp_path / "counters")
    (state / "versions").symlink_to(tmp_path / "counters")
    with pytest.raises(RuntimeError, match=f"state directory {state / 'versions'} is a symbolic link"):
        d.start(timeout=30)
