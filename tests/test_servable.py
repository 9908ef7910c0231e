"""Every set the daemon accepts can be served: a table whose manifest would not fit one `open`
reply frame is refused at put_begin (and publish, and load) with the limit named, and one just
inside the limit is put and read back. Zero-size tensors with 200-byte names keep it cheap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdk
from tensord_contract import wire
from tensord_contract.manifest import MAX_MANIFEST_BYTES, Table
from tensord_contract.manifest.columns import WIRE_ROW_BYTES
from tests.frames import Raw, code

NAME_BYTES = 200
ROW = NAME_BYTES + 1 + WIRE_ROW_BYTES + 8  # name, NUL, the fixed columns, one dim
FITS = MAX_MANIFEST_BYTES // ROW  # the most such tensors a set may hold


def _names(count: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:0{NAME_BYTES - len(prefix)}d}" for i in range(count)]


def _wire_table(count: int) -> dict[str, object]:
    """The wire form of `count` zero-size float32 tensors, built without the client's checks."""
    return {
        "count": count,
        "names": "\0".join(_names(count)).encode(),
        "dtypes": bytes([Table.build(["x"], ["float32"], [[0]]).dtypes[0]]) * count,
        "ndims": b"\x01" * count,
        "dims": np.zeros(count, dtype="<i8").tobytes(),
    }


def test_the_limit_is_the_open_reply_frame() -> None:
    assert MAX_MANIFEST_BYTES < wire.MAX_FRAME
    assert 250_000 < FITS < 300_000  # the 300,000 x 200-byte names lie beyond it
    with pytest.raises(sdk.InvalidArgument, match=f"{MAX_MANIFEST_BYTES}-byte limit"):
        Table.from_wire(_wire_table(FITS + 1))
    assert len(Table.from_wire(_wire_table(FITS))) == FITS


def test_a_put_beyond_the_limit_is_refused_at_put_begin_and_one_inside_it_is_served(daemon) -> None:
    over = _wire_table(300_000)
    raw = Raw(daemon.socket)
    try:
        for op, extra in (("put_begin", {"device": "cpu"}), ("publish", {"replica": {}, "fingerprints": b""})):
            reply = raw.call(op, name="big/over", tensors=over, **extra)
            assert code(reply) == "invalid_argument", reply
            assert str(MAX_MANIFEST_BYTES) in reply["error"]["message"]
            assert reply["error"]["details"]["limit"] == MAX_MANIFEST_BYTES
    finally:
        raw.close()
    empty = torch.empty(0)
    with daemon.client() as c:
        assert "big/over" not in [s["name"] for s in c.ls()]
        with pytest.raises(sdk.InvalidArgument, match="limit"):  # the SDK says so before sending
            c.put("big/over", dict.fromkeys(_names(FITS + 1), empty))
        names = _names(FITS)
        version = c.put("big/fits", dict.fromkeys(names, empty))
        got = c.get("big/fits", version)  # its open reply fits one frame
        assert len(got) == FITS and got[names[-1]].shape == (0,)
        c.delete("big/fits")
