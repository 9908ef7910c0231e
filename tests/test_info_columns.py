"""info(tensors=True) travels as columns and reads as the mapping it always was."""

from __future__ import annotations

import json
import random

import pytest
import torch

import sdk
from sdk.catalogue import CatalogueClient
from tensord_contract.manifest import Table
from tensord_contract.rows import TensorRows
from tests.daemons import tensord


def _mixed(count: int) -> dict[str, torch.Tensor]:
    rng = random.Random(3)
    dtypes = [torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.complex64]
    out = {}
    for i in range(count):
        shape = [rng.randrange(0, 5) for _ in range(rng.randrange(0, 4))]
        out[f"layers.{i % 61}.t{i}"] = torch.zeros(shape, dtype=dtypes[i % len(dtypes)])
    keys = list(out)
    rng.shuffle(keys)
    return {k: out[k] for k in keys}


def test_rows_match_the_old_form_and_read_as_a_mapping(daemon, client) -> None:
    tensors = _mixed(3000)
    version = client.put("columns/mixed", tensors)
    with CatalogueClient(daemon.socket) as c:
        info = c.info("columns/mixed", tensors=True)
        old, _ = c._conn().call("info", name="columns/mixed", version=version, tensors=True)
    rows = info["tensors"]
    assert isinstance(rows, TensorRows) and len(rows) == 3000
    assert rows == old["tensors"] and dict(rows.items()) == old["tensors"]
    assert list(rows) == list(tensors) and list(rows.values()) == list(old["tensors"].values())
    name, t = next(iter(tensors.items()))
    assert name in rows and "nope" not in rows
    assert rows[name] == {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "nbytes": t.nbytes}
    with pytest.raises(KeyError):
        rows["nope"]
    out = tensord("info", "columns/mixed", "--json", socket=daemon.socket)
    assert json.loads(out.stdout)["tensors"] == old["tensors"]


def test_an_empty_set_and_bad_columns(client) -> None:
    client.put("columns/empty", {})
    assert dict(client.info("columns/empty", tensors=True)["tensors"]) == {}
    good = Table.build(["a", "b"], ["float32", "int8"], [[2, 3], []]).to_wire()
    assert dict(TensorRows(good)) == {
        "a": {"dtype": "float32", "shape": [2, 3], "nbytes": 24},
        "b": {"dtype": "int8", "shape": [], "nbytes": 1},
    }
    for bad in (
        None,
        {**good, "count": 3},
        {**good, "dims": good["dims"][:-1]},
        {**good, "dims": good["dims"][:-8]},
        {**good, "dtypes": b"\x00\xff"},
        {**good, "ndims": "xx"},
    ):
        with pytest.raises(sdk.ProtocolError):
            TensorRows(bad)


def test_lookups_search_the_names_until_they_are_indexed() -> None:
    names = ["a", "ba", "a.b", "b", "x/a", "ab", "é"]
    rows = TensorRows(Table.build(names, ["int8"] * len(names), [[i] for i in range(len(names))]).to_wire())
    for indexed in (False, True):
        for i, name in enumerate(names):
            assert name in rows and rows[name]["shape"] == [i], (name, indexed)
        for missing in ("", "c", "a.", ".b", "x", "a\0ba", 5, None):
            assert missing not in rows
        assert "index" in rows.__dict__ or not indexed
        rows.index  # noqa: B018 - build it: the second pass goes through the dict
    bad = {**Table.build(["a", "b"], ["int8"] * 2, [[], []]).to_wire(), "names": b"a\xff\x00b"}
    with pytest.raises(sdk.ProtocolError, match="UTF-8"):
        list(TensorRows(bad))


def test_the_daemon_refuses_other_tensors_values(daemon) -> None:
    with CatalogueClient(daemon.socket) as c:
        for bad in ("rows", 1, [True]):
            with pytest.raises(sdk.InvalidArgument):
                c._conn().call("info", name="columns/empty", tensors=bad)
