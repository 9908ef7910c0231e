"""Columnar manifests: round trips, layouts, and every way a manifest can lie."""

from __future__ import annotations

import numpy as np
import pytest

import sdk
from tensord_contract.manifest import ALIGN, DTYPE_CODES, MAX_TENSORS, Manifest, Table, check_spec


def _table() -> Table:
    return Table.build(["a", "b", "c", "d"], ["float32", "bfloat16", "int8", "complex128"], [[2, 3], [], [0], [5, 1]])


def _manifest(n: int | None = None) -> Manifest:
    table = (
        _table()
        if n is None
        else Table.build([f"t.{i}" for i in range(n)], ["uint8"] * n, [[i % 300] for i in range(n)])
    )
    offsets, nbytes = table.layout()
    fps = np.arange(len(table), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return Manifest("model/tp0", 7, table, offsets, nbytes, fingerprints=fps, created=123.0, origin="put by test")


def test_manifest_round_trips() -> None:
    m = _manifest()
    back = Manifest.from_wire(m.to_wire())
    assert (back.name, back.version, back.origin, back.created, back.nbytes) == (
        "model/tp0",
        7,
        "put by test",
        123.0,
        m.nbytes,
    )
    assert back.names == ["a", "b", "c", "d"]
    assert np.array_equal(back.offsets, m.offsets) and np.array_equal(back.fingerprints, m.fingerprints)
    assert (
        back["a"].nbytes == 24 and back["b"].shape == () and back["c"].nbytes == 0 and back["d"].dtype == "complex128"
    )
    assert [t.offset % ALIGN for t in back.tensors] == [0, 0, 0, 0]
    assert back.dtype_counts() == {"float32": 1, "bfloat16": 1, "int8": 1, "complex128": 1}
    assert back.rows()["d"] == {"dtype": "complex128", "shape": [5, 1], "nbytes": 80}


def test_a_large_manifest_round_trips_in_columns() -> None:
    m = _manifest(100_000)
    back = Manifest.from_wire(m.to_wire())
    assert len(back) == 100_000 and back.names[-1] == "t.99999"
    assert np.array_equal(back.sizes, np.arange(100_000) % 300)
    assert back["t.299"].offset == int(m.offsets[299])


def test_layout_aligns_every_tensor() -> None:
    table = Table.build(["x", "y", "e", "z"], ["uint8", "float64", "float32", "int16"], [[3], [5], [0], [1]])
    offsets, nbytes = table.layout()
    assert offsets.tolist() == [0, ALIGN, 2 * ALIGN, 2 * ALIGN] and nbytes == 3 * ALIGN


def _bytes(values: list[int], dtype: str = "<i8") -> bytes:
    return np.array(values, dtype=dtype).tobytes()


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda w: w.__setitem__("sizes", _bytes([25, 2, 0, 80])), id="size-disagrees-with-shape"),
        pytest.param(lambda w: w.__setitem__("offsets", _bytes([0, 8, 512, 768])), id="misaligned-offset"),
        pytest.param(lambda w: w.__setitem__("offsets", _bytes([0, 0, 512, 768])), id="overlapping-ranges"),
        pytest.param(lambda w: w.__setitem__("offsets", _bytes([0, 256, 512, 1 << 40])), id="offset-past-the-slab"),
        pytest.param(lambda w: w.__setitem__("offsets", _bytes([-256, 256, 512, 768])), id="negative-offset"),
        pytest.param(lambda w: w.__setitem__("nbytes", 100), id="slab-too-small"),
        pytest.param(lambda w: w.__setitem__("nbytes", -1), id="negative-slab"),
        pytest.param(lambda w: w.__setitem__("dtypes", bytes([0, 1, 2, len(DTYPE_CODES)])), id="bad-dtype-code"),
        pytest.param(lambda w: w.__setitem__("dtypes", bytes([0, 1, 2])), id="short-dtype-column"),
        pytest.param(lambda w: w.__setitem__("names", b"a\0b\0a\0d"), id="duplicate-name"),
        pytest.param(lambda w: w.__setitem__("names", b"a\0\0c\0d"), id="empty-name"),
        pytest.param(lambda w: w.__setitem__("names", b"a\0b\0c"), id="too-few-names"),
        pytest.param(lambda w: w.__setitem__("names", b"a\0b\0c\0\xff"), id="not-utf8"),
        pytest.param(lambda w: w.__setitem__("names", b"a\0b\0c\0" + b"x" * 1025), id="name-too-long"),
        pytest.param(lambda w: w.__setitem__("ndims", bytes([2, 0, 1, 17])), id="too-many-dims"),
        pytest.param(lambda w: w.__setitem__("dims", _bytes([2, 3, -1, 5, 1])), id="negative-dim"),
        pytest.param(lambda w: w.update(dims=_bytes([1 << 47, 1 << 47, 0, 5, 1])), id="tensor-too-large"),
        pytest.param(lambda w: w.__setitem__("count", 1_000_000), id="a-million-rows"),
        pytest.param(lambda w: w.__setitem__("count", MAX_TENSORS + 1), id="past-the-row-limit"),
        pytest.param(lambda w: w.__setitem__("fingerprints", b"\0" * 24), id="short-fingerprints"),
        pytest.param(lambda w: w.__setitem__("fp", 1), id="unknown-fingerprint-definition"),
        pytest.param(lambda w: w.pop("version"), id="no-version"),
        pytest.param(lambda w: w.__setitem__("offsets", [0, 256, 512, 768]), id="column-not-bytes"),
        pytest.param(lambda w: w.__setitem__("origin", 5), id="origin-not-text"),
    ],
)
def test_lying_manifests_are_refused(mutate) -> None:
    w = dict(_manifest().to_wire())
    mutate(w)
    with pytest.raises(sdk.ProtocolError):
        Manifest.from_wire(w)


def test_a_manifest_of_a_million_rows_is_refused_before_it_is_decoded() -> None:
    n = 1_000_000
    w = {
        "count": n,
        "names": b"\0".join(b"t%d" % i for i in range(n)),
        "dtypes": bytes(n),
        "ndims": bytes(n),
        "dims": b"",
    }
    with pytest.raises(sdk.ProtocolError, match="count"):
        Manifest.from_wire({**w, "name": "x", "version": 1, "nbytes": n * ALIGN, "offsets": b"", "sizes": b""})


@pytest.mark.parametrize(
    ("names", "dtypes", "shapes"),
    [
        (["a", "a"], ["float32"] * 2, [[1], [1]]),
        (["a\0b"], ["float32"], [[1]]),
        ([""], ["float32"], [[1]]),
        (["\udcff"], ["float32"], [[1]]),
        ([b"a"], ["float32"], [[1]]),
        (["a"], ["float128"], [[1]]),
        (["a"], ["float32"], [[-1]]),
        (["a"], ["float32"], [[1.0]]),
        (["a"], ["float32"], [[2**47, 2**47, 2**47]]),
        (["a"], ["float32"], [[1] * 17]),
        (["a", "b"], ["float32"], [[1], [1]]),
    ],
)
def test_bad_tables_are_invalid_arguments(names, dtypes, shapes) -> None:
    with pytest.raises(sdk.InvalidArgument):
        Table.build(names, dtypes, shapes)


def test_check_spec_fills_in_the_size() -> None:
    spec = check_spec("w", "bfloat16", [3, 4])
    assert (spec.name, spec.dtype, spec.shape, spec.nbytes) == ("w", "bfloat16", (3, 4), 24)


def test_a_known_table_is_used_only_for_the_same_columns() -> None:
    """A training step's put carries its set's table again: the daemon uses the one it decoded
    before, but only where every column is byte for byte the same."""
    known = Table.build(["a", "b"], ["float32", "bfloat16"], [[4, 2], [3]])
    assert Table.from_wire(known.to_wire(), known=known) is known
    for key, value in [
        ("names", Table.build(["a", "c"], ["float32", "bfloat16"], [[4, 2], [3]]).to_wire()["names"]),
        ("dtypes", np.array([0, 0], np.uint8).tobytes()),
        ("dims", np.array([4, 3, 3], "<i8").tobytes()),
    ]:
        wire = {**known.to_wire(), key: value}
        decoded = Table.from_wire(wire, known=known)
        assert decoded is not known and decoded.to_wire()[key] == value
    with pytest.raises(sdk.InvalidArgument):
        Table.from_wire({**known.to_wire(), "ndims": b"\x01"}, known=known)


def test_a_placing_wire_carries_no_table_and_is_checked_against_the_given_one() -> None:
    """A reader given a new version of a layout it has gets the places and fingerprints only."""
    m = _manifest()
    wire = m.placing_wire
    assert not {"names", "dtypes", "ndims", "dims", "sizes", "count"} & wire.keys()
    assert {**m.table.to_wire(), "sizes": m.wire["sizes"], **wire} == m.wire
    back = Manifest.from_wire(wire, table=m.table)
    assert back.table is m.table and back == m
    with pytest.raises(sdk.ProtocolError):
        Manifest.from_wire(wire)  # no table
    with pytest.raises(sdk.ProtocolError, match="overlaps"):  # the places are checked as ever
        Manifest.from_wire({**wire, "offsets": _bytes([0, 0, 256, 512])}, table=m.table)
    other = Table.build(["a", "b", "c", "d"], ["float32"] * 4, [[9, 9]] * 4)  # rows past the slab
    with pytest.raises(sdk.ProtocolError, match="past the slab"):
        Manifest.from_wire(wire, table=other)
    assert Manifest.from_wire(wire, table=m.table, like=m) == m  # placed alike: not sorted again
    for change, match in (({"offsets": _bytes([0, 0, 256, 512])}, "overlaps"), ({"nbytes": 580}, "past the slab")):
        with pytest.raises(sdk.ProtocolError, match=match):  # placed otherwise: checked in full
            Manifest.from_wire({**wire, **change}, table=m.table, like=m)
    with pytest.raises(sdk.ProtocolError, match="past the slab"):  # `like` of another table: no help
        Manifest.from_wire(wire, table=other, like=m)
