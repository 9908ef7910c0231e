"""The catalogue stores each distinct table of its manifests once (`tensord.held_tables`): a
new version of a recorded layout writes its places and fingerprints only; what it reads back
is the whole manifest; damaged or missing table files leave their records unrestored."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from tensord.state import Catalogue
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest, table_of
from tensord_contract.manifest.version import TABLE_KEYS

TABLE = table_of({f"layer{i}.w": ("bfloat16", (64, 32 + i)) for i in range(300)})


def _manifest(version: int, table=TABLE) -> Manifest:
    offsets, nbytes = table.layout()
    fps = np.arange(len(table), dtype=np.uint64) + version
    return Manifest("set/a", 0, table, offsets, nbytes).committed(version, fps, time.time(), 3)


def _note(cat: Catalogue, m: Manifest) -> None:
    asyncio.run(cat.note(m, "cpu", "put by test", evicted=False, with_manifest=True))


def _reloaded(directory: Path) -> Catalogue:
    cat = Catalogue(directory)
    cat.load()
    return cat


def _same(back: dict, m: Manifest) -> None:
    again = Manifest.from_wire(back, InvalidArgument)
    assert again.table.digest == m.table.digest and np.array_equal(again.fingerprints, m.fingerprints)
    assert (again.name, again.version, again.nbytes) == (m.name, m.version, m.nbytes)


def test_versions_of_one_layout_share_one_table_file(tmp_path: Path) -> None:
    cat = _reloaded(tmp_path)
    first, second = _manifest(1), _manifest(2)
    _note(cat, first)
    _note(cat, second)
    tables = list((tmp_path / "tables").iterdir())
    assert [p.name for p in tables] == [f"{TABLE.digest.hex()}.tbl"]
    records = sorted(tmp_path.glob("*.rec"))
    assert len(records) == 2 and all(p.stat().st_size < tables[0].stat().st_size / 2 for p in records)
    back = _reloaded(tmp_path)
    _same(back.get("set/a", 1).manifest, first)  # type: ignore[union-attr]
    _same(back.get("set/a", 2).manifest, second)  # type: ignore[union-attr]
    asyncio.run(back.forget("set/a", 1))
    assert tables[0].exists()  # version 2 still uses it
    asyncio.run(back.forget("set/a", 2))
    assert not tables[0].exists()


def test_records_whose_table_is_damaged_or_missing_are_skipped(tmp_path: Path, caplog) -> None:
    cat = _reloaded(tmp_path)
    _note(cat, _manifest(1))
    other = table_of({"x": ("float32", (3,))})
    _note(cat, _manifest(2, other))
    path = tmp_path / "tables" / f"{TABLE.digest.hex()}.tbl"
    part = msgpack.unpackb(path.read_bytes())
    part["names"] = part["names"].replace(b"layer1", b"layerX")  # a table, but not this one
    path.write_bytes(msgpack.packb(part))
    back = _reloaded(tmp_path)
    assert back.get("set/a", 1) is None and back.get("set/a", 2) is not None
    assert any("missing or damaged" in r.getMessage() for r in caplog.records)
    assert not path.exists()  # no restored record uses it any more
    (tmp_path / "tables" / f"{'0' * 64}.tbl").write_bytes(b"orphan")
    assert _reloaded(tmp_path).get("set/a", 2) is not None
    assert not (tmp_path / "tables" / f"{'0' * 64}.tbl").exists()


def test_a_record_with_its_table_inline_still_loads(tmp_path: Path) -> None:
    """Records written before tables were stored apart carry the whole manifest."""
    m = _manifest(4)
    data = {"format": 1, "name": "set/a", "version": 4, "device": "cpu", "source": "s", "evicted": False}
    (tmp_path / Catalogue.filename("set/a", 4)).write_bytes(msgpack.packb({**data, "manifest": m.to_wire()}))
    back = _reloaded(tmp_path)
    record = back.get("set/a", 4)
    assert record is not None and record.table == ""
    _same(record.manifest, m)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["../../etc/passwd", "ab", 7])
def test_a_bad_table_name_in_a_record_is_refused(tmp_path: Path, key: object) -> None:
    m = _manifest(5)
    stored = {k: v for k, v in m.to_wire().items() if k not in TABLE_KEYS}
    data = {"format": 1, "name": "set/a", "version": 5, "device": "cpu", "source": "s", "evicted": False}
    (tmp_path / Catalogue.filename("set/a", 5)).write_bytes(
        msgpack.packb({**data, "manifest": {**stored, "table": key}})
    )
    assert _reloaded(tmp_path).get("set/a", 5) is None
