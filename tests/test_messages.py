"""Typed op messages (tensord_contract.messages): what each side builds, the other decodes, and
malformed messages are refused with the error of the side that reads them."""

from __future__ import annotations

import pytest

from tensord_contract.errors import InvalidArgument, ProtocolError
from tensord_contract.messages import MAX_HAVE, OpenReply, OpenRequest


def test_open_request_round_trips_and_leaves_out_defaults() -> None:
    request = OpenRequest("a/b", 3, ("n1",), frozenset({(3, 7), (2, 1)}), mount=True)
    wire = request.to_wire()
    assert wire == {"name": "a/b", "version": 3, "exclude": ["n1"], "have": [[2, 1], [3, 7]], "mount": True}
    assert OpenRequest.from_wire({"op": "open", **wire}, InvalidArgument) == request
    assert OpenRequest("a/b").to_wire() == {"name": "a/b", "version": None}
    assert OpenRequest.from_wire({"name": "a/b", "version": "latest"}, InvalidArgument).version is None


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ({"version": 1}, "set name"),
        ({"name": "a", "mount": 1}, "mount"),
        ({"name": "a", "exclude": "n1"}, "exclude"),
        ({"name": "a", "have": [[1]]}, "pairs"),
        ({"name": "a", "have": [[1, "2"]]}, "pairs"),
        ({"name": "a", "have": [[1, 1]] * (MAX_HAVE + 1)}, "at most"),
        ({"name": "a", "version": 0}, "version"),
        ({"name": "A B"}, "name"),
    ],
)
def test_malformed_open_requests_are_invalid_arguments(wire: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        OpenRequest.from_wire(wire, InvalidArgument)


def test_open_reply_round_trips_and_malformed_replies_are_protocol_errors() -> None:
    reply = OpenReply(5, 2, {"kind": "host"}, None)
    assert OpenReply.from_wire(reply.to_wire(), ProtocolError) == reply
    for bad in (None, [], {"pin": "5", "version": 2, "replica": {}}, {"pin": 5, "version": 2, "replica": None}):
        with pytest.raises(ProtocolError, match="malformed open reply"):
            OpenReply.from_wire(bad, ProtocolError)
