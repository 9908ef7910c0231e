"""The wire contract without a daemon: errors and frames (manifests: test_manifest.py)."""

from __future__ import annotations

import pytest

import sdk
from tensord_contract import wire
from tensord_contract.errors import CODES, from_wire


def test_error_codes_map_to_one_tree() -> None:
    for code in CODES:
        exc = from_wire({"code": code, "message": "m", "details": {"name": "x"}})
        assert isinstance(exc, sdk.TensordError) and exc.code == code and exc.details == {"name": "x"}
    assert isinstance(from_wire({"code": "no-such-code", "message": "m"}), sdk.TensordError)
    assert isinstance(from_wire("garbage"), sdk.ProtocolError)


def test_frames() -> None:
    frame = wire.encode({"id": 1, "op": "ls", "args": {}})
    assert wire.frame_length(frame[:4]) == len(frame) - 4
    assert wire.decode(frame[4:]) == {"id": 1, "op": "ls", "args": {}}
    with pytest.raises(sdk.ProtocolError):
        wire.frame_length((wire.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(sdk.ProtocolError):
        wire.decode(b"\xc1")
