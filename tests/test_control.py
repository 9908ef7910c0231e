"""The sans-I/O control-plane core without sockets: requests, replies, frames, server checks."""

from __future__ import annotations

import pytest

import sdk
from tensord_contract import control, wire


def _reply(request_id: object, **fields: object) -> bytes:
    return wire.encode({"id": request_id, **fields})


def _body(frames: control.FrameReader, data: bytes) -> dict[str, object]:
    frames.feed(data)
    body = frames.next()
    assert body is not None
    return wire.decode(body)


def test_request_and_reply_round_trip() -> None:
    core, frames = control.ClientProtocol(), control.FrameReader()
    first, frame = core.request("ls", {"prefix": "a/"})
    second, _ = core.request("status", {})
    assert (first, second) == (1, 2)
    assert _body(frames, frame) == {"id": 1, "op": "ls", "args": {"prefix": "a/"}}
    reply = _body(frames, _reply(first, ok=True, result={"sets": []}, fds=0))
    assert not core.late(reply)
    core.check(reply, first, "ls")
    assert core.result(reply) == {"sets": []}


def test_a_reply_to_another_request_or_with_other_descriptors_is_refused() -> None:
    core = control.ClientProtocol()
    request_id, _ = core.request("open", {"name": "m"})
    with pytest.raises(sdk.ProtocolError, match="does not match request 1 \\(open\\)"):
        core.check({"id": 7, "ok": True, "result": {}}, request_id, "open")
    with pytest.raises(sdk.ProtocolError):
        core.check({"id": request_id, "ok": True, "result": {}, "fds": 1}, request_id, "open", fds=0)
    with pytest.raises(sdk.ProtocolError):
        core.check({"id": request_id, "ok": True, "result": {}}, request_id, "open", fds=2)
    core.check({"id": request_id, "ok": True, "result": {}, "fds": 2}, request_id, "open", fds=2)


def test_replies_to_posted_requests_are_late() -> None:
    core = control.ClientProtocol()
    posted, _ = core.request("release", {"pin": 3})
    core.posted(posted)
    waiting, _ = core.request("ls", {})
    assert core.late({"id": posted, "ok": True, "result": {}})
    assert not core.late({"id": posted, "ok": True, "result": {}})  # once only
    assert not core.late({"id": waiting, "ok": True, "result": {}})


def test_error_replies_map_to_the_exception_tree() -> None:
    error = sdk.NotFound("no set m", name="m").to_wire()
    with pytest.raises(sdk.NotFound, match="no set m") as info:
        control.ClientProtocol.result({"id": 1, "ok": False, "error": error})
    assert info.value.details == {"name": "m"}
    with pytest.raises(sdk.ProtocolError, match="malformed error reply"):
        control.ClientProtocol.result({"id": 1, "ok": False, "error": "nonsense"})


def test_arguments_msgpack_cannot_hold_are_invalid() -> None:
    core = control.ClientProtocol()
    with pytest.raises(sdk.InvalidArgument, match="put_begin: an argument cannot be sent"):
        core.request("put_begin", {"size": 2**64})
    with pytest.raises(sdk.InvalidArgument):
        core.request("ls", {"prefix": object()})
    with pytest.raises(sdk.ProtocolError, match="exceeds"):
        core.request("put_commit", {"fingerprints": bytes(wire.MAX_FRAME)})


@pytest.mark.parametrize("token", [None, "", "s3cret"])
def test_hello_carries_version_identity_and_token_when_there_is_one(token: str | None) -> None:
    request_id, frame = control.ClientProtocol().hello("pid:7", token)
    request = _body(control.FrameReader(), frame)
    assert request["id"] == request_id and request["op"] == "hello"
    expected = {"protocol": wire.PROTOCOL_VERSION, "client": "pid:7"}
    assert request["args"] == ({**expected, "token": token} if token else expected)


def test_frames_arrive_in_pieces_and_back_to_back() -> None:
    frames = control.FrameReader()
    one, two = wire.encode({"id": 1}), wire.encode({"id": 2, "blob": b"x" * 1000})
    assert frames.wanted == wire.HEADER.size and not frames.inside
    frames.feed(one[:2])
    assert frames.in_header and frames.inside and frames.wanted == 2 and frames.next() is None
    frames.feed(one[2:5])
    assert not frames.in_header and frames.wanted == len(one) - 5
    frames.feed(one[5:] + two)  # more than one frame at once
    assert wire.decode(frames.next() or b"") == {"id": 1}
    assert wire.decode(frames.next() or b"") == {"id": 2, "blob": b"x" * 1000}
    assert frames.next() is None and not frames.inside and frames.wanted == wire.HEADER.size


def test_oversized_frames_are_refused_at_their_header() -> None:
    frames = control.FrameReader(limit=control.frame_limit(False))
    assert frames.limit == wire.MAX_UNTRUSTED_FRAME and control.frame_limit(True) == wire.MAX_FRAME
    frames.feed(wire.MAX_UNTRUSTED_FRAME.to_bytes(4, "big"))  # at the limit: fine
    assert frames.wanted == wire.MAX_UNTRUSTED_FRAME
    with pytest.raises(sdk.ProtocolError, match="exceeds the 65536-byte limit"):
        control.FrameReader(limit=wire.MAX_UNTRUSTED_FRAME).feed((wire.MAX_UNTRUSTED_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(sdk.ProtocolError):
        control.FrameReader().feed((wire.MAX_FRAME + 1).to_bytes(4, "big"))
    empty = control.FrameReader()
    empty.feed((0).to_bytes(4, "big"))
    assert empty.next() == b""


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"id": "1", "op": "ls", "args": {}}, sdk.ProtocolError),
        ({"id": 1, "op": 5, "args": {}}, sdk.ProtocolError),
        ({"id": 1, "op": "nope", "args": {}}, sdk.InvalidArgument),
        ({"id": 1, "op": "ls", "args": []}, sdk.InvalidArgument),
        ({"id": 1, "op": "ls", "args": {1: 2}}, sdk.InvalidArgument),
        ({"id": 1, "op": "ls", "args": {"op": "x"}}, sdk.InvalidArgument),
    ],
)
def test_requests_of_the_wrong_shape_are_refused(request_: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        control.check_request(request_)


def test_requests_before_hello_and_well_formed_ones() -> None:
    with pytest.raises(sdk.ProtocolError, match="the first request must be hello"):
        control.check_request({"id": 1, "op": "ls"}, hello=False)
    assert control.check_request({"id": 1, "op": "hello", "args": {"protocol": 2}}, hello=False) == (
        "hello",
        {"protocol": 2},
    )
    assert control.check_request({"id": 1, "op": "ls"}) == ("ls", {})
    assert control.request_id({"id": 4}) == 4
    assert control.request_id({"id": True}) is None and control.request_id({}) is None


def test_error_frames_can_always_be_sent() -> None:
    frames = control.FrameReader()
    reply = _body(frames, control.error_frame(3, sdk.NotFound("gone", name="m")))
    assert reply == {"id": 3, "ok": False, "error": {"code": "not_found", "message": "gone", "details": {"name": "m"}}}
    huge = _body(frames, control.error_frame(4, sdk.InvalidArgument("bad", size=2**64)))
    assert huge["error"] == {"code": "invalid_argument", "message": "bad", "details": {}}
    with pytest.raises(sdk.InvalidArgument, match="bad"):
        control.ClientProtocol.result(huge)
