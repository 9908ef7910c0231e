"""The wire contract without a daemon: manifests, names, errors, frames."""

from __future__ import annotations

import pytest

import sdk
from sdk import wire
from sdk.errors import CODES, from_wire
from sdk.manifest import ALIGN, Manifest, TensorSpec, check_spec, layout


def _manifest() -> Manifest:
    specs, nbytes = layout(
        [check_spec("a", "float32", [2, 3]), check_spec("b", "bfloat16", []), check_spec("c", "int8", [0])]
    )
    tensors = tuple(s._replace(fingerprint=i) for i, s in enumerate(specs))
    return Manifest("model/tp0", 7, tensors, nbytes, 123.0, "put by test")


def test_manifest_round_trips() -> None:
    m = _manifest()
    back = Manifest.from_wire(m.to_wire())
    assert back == m
    assert (back.name, back.version, back.origin) == ("model/tp0", 7, "put by test")
    assert [t.offset % ALIGN for t in back.tensors] == [0, 0, 0]
    assert back["a"].nbytes == 24 and back["b"].shape == ()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w["tensors"][0].__setitem__(4, 25),  # length disagrees with shape
        lambda w: w["tensors"][1].__setitem__(3, 8),  # misaligned offset
        lambda w: w["tensors"][1].__setitem__(3, 0),  # overlaps tensor a
        lambda w: w["tensors"][0].__setitem__(1, "float128"),
        lambda w: w["tensors"][0].__setitem__(5, -1),
        lambda w: w.__setitem__("nbytes", 10),  # tensors out of the slab
        lambda w: w["tensors"].append(list(w["tensors"][0])),  # duplicate name
        lambda w: w.pop("version"),
        lambda w: w.__setitem__("tensors", "x"),
    ],
)
def test_inconsistent_manifests_are_refused(mutate) -> None:
    w = _manifest().to_wire()
    mutate(w)
    with pytest.raises(sdk.InvalidArgument):
        Manifest.from_wire(w)


def test_layout_aligns_every_tensor() -> None:
    specs, nbytes = layout([TensorSpec("x", "uint8", (3,), 0, 3), TensorSpec("y", "float64", (5,), 0, 40)])
    assert [s.offset for s in specs] == [0, ALIGN] and nbytes == 2 * ALIGN


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
