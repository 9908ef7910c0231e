"""Typed op messages (tensord_contract.messages): what each side builds, the other decodes, and
malformed messages are refused with the error of the side that reads them."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from tensord_contract.catalogue_messages import (
    InfoReply,
    InfoRequest,
    LoadReply,
    LoadRequest,
    LsEntry,
    LsReply,
    LsRequest,
    PartialInfo,
    PassedFile,
    WaitReply,
    WaitRequest,
)
from tensord_contract.descriptors import IPC_HANDLE_BYTES, PublishedIpcReplica, PublishedReplica, published_from_wire
from tensord_contract.errors import InvalidArgument, ProtocolError
from tensord_contract.manifest import table_of
from tensord_contract.message_checks import MAX_FAN_OUT, MAX_HAVE, MAX_ORIGIN
from tensord_contract.messages import (
    DeleteReply,
    DeleteRequest,
    FanOutReply,
    OpenReply,
    OpenRequest,
    PutAbortReply,
    PutAbortRequest,
    ReleaseReply,
    ReleaseRequest,
    ReplicateReply,
    ReplicateRequest,
    UnpublishReply,
    UnpublishRequest,
)
from tensord_contract.node_messages import (
    HelloReply,
    HelloRequest,
    NodeEntry,
    NodesReply,
    NodesRequest,
    StatusReply,
    StatusRequest,
)
from tensord_contract.streams import (
    MAX_WAIT,
    MIN_CHUNK,
    StreamChunksReply,
    StreamChunksRequest,
    StreamOpenReply,
    StreamOpenRequest,
    StreamPairReply,
    StreamPairRequest,
)
from tensord_contract.table_messages import (
    PublishReply,
    PublishRequest,
    PutBeginReply,
    PutBeginRequest,
    PutCommitReply,
    PutCommitRequest,
)


def test_open_request_round_trips_and_leaves_out_defaults() -> None:
    request = OpenRequest("a/b", 3, ("n1",), frozenset({(3, 7), (2, 1)}), mount=True)
    wire = request.to_wire()
    assert wire == {"name": "a/b", "version": 3, "exclude": ["n1"], "have": [[2, 1], [3, 7]], "mount": True}
    assert OpenRequest.from_wire({"op": "open", **wire}, InvalidArgument) == request
    assert OpenRequest("a/b").to_wire() == {"name": "a/b", "version": None}
    assert OpenRequest.from_wire({"name": "a/b", "version": "latest"}, InvalidArgument).version is None
    refs = OpenRequest("a/b", table_refs=True)
    assert refs.to_wire()["table_refs"] is True
    assert OpenRequest.from_wire(refs.to_wire(), InvalidArgument) == refs


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        ({"version": 1}, "set name"),
        ({"name": "a", "mount": 1}, "mount"),
        ({"name": "a", "table_refs": 1}, "table_refs"),
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
    placed = OpenReply(5, 3, {"kind": "host"}, {"offsets": b""}, (2, 1))
    assert placed.to_wire()["table_of"] == [2, 1]
    assert OpenReply.from_wire(placed.to_wire(), ProtocolError) == placed
    ok = {"pin": 5, "version": 2, "replica": {}}
    for bad in (
        None,
        [],
        {"pin": "5", "version": 2, "replica": {}},
        {"pin": 5, "version": 2, "replica": None},
        {**ok, "manifest": {}, "table_of": [2]},
        {**ok, "manifest": {}, "table_of": [2, "1"]},
        {**ok, "manifest": None, "table_of": [2, 1]},
    ):
        with pytest.raises(ProtocolError, match="malformed open reply"):
            OpenReply.from_wire(bad, ProtocolError)


def test_the_core_messages_import_no_numpy() -> None:
    """`sdk.catalogue` (the `tensord` command) may use them: it must stay fast to start."""
    code = (
        "import sys, tensord_contract.messages, tensord_contract.catalogue_messages, tensord_contract.node_messages; "
    )
    code += "print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_command_loads_only_the_messages_it_sends() -> None:
    """`tensord ls/info/load` import the catalogue's and node's messages, not the data ops'."""
    code = "import sys, sdk.catalogue, tensord.cli.main, tensord.cli.passing; "
    code += "print(sorted({'tensord_contract.messages', 'tensord_contract.table_messages'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_requests_refuse_unknown_and_missing_keys() -> None:
    with pytest.raises(InvalidArgument, match="unknown arguments"):
        OpenRequest.from_wire({"name": "a", "pin": 1}, InvalidArgument)
    with pytest.raises(InvalidArgument, match="missing arguments"):
        PutBeginRequest.from_wire({"name": "a"}, InvalidArgument)
    with pytest.raises(InvalidArgument, match="needs its table"):
        PutBeginRequest.from_wire({"name": "a", "device": "cpu"}, InvalidArgument)


# -- put_begin ------------------------------------------------------------------------------------
TABLE = table_of({"w": ("float32", (4, 2)), "b": ("bfloat16", (3,))})


def test_put_begin_round_trips() -> None:
    request = PutBeginRequest("a/b", "cuda:0", TABLE, "file:/x")
    back = PutBeginRequest.from_wire({"op": "put_begin", **request.to_wire()}, InvalidArgument)
    assert (back.name, back.device, back.origin, back.table.names) == ("a/b", "cuda:0", "file:/x", TABLE.names)
    assert "origin" not in PutBeginRequest("a", "cpu", TABLE).to_wire()
    reply = PutBeginReply(7, np.array([0, 256], dtype=np.int64), 512, {"kind": "host"})
    back_reply = PutBeginReply.from_wire(reply.to_wire(), ProtocolError, 2)
    assert (back_reply.reservation, back_reply.offsets.tolist(), back_reply.nbytes) == (7, [0, 256], 512)
    assert back_reply.replica == {"kind": "host"}


def test_put_begin_names_a_known_table_by_its_digest() -> None:
    """A table named by digest is the daemon's known table only where the digests agree."""
    request = PutBeginRequest("a", "cpu", TABLE, by_digest=True)
    wire = request.to_wire()
    assert "tensors" not in wire and wire["table_digest"] == TABLE.digest and len(TABLE.digest) == 32
    same = table_of({"w": ("float32", (4, 2)), "b": ("bfloat16", (3,))})  # decoded alike: same digest
    assert PutBeginRequest.from_wire(wire, InvalidArgument, same).table is same
    for other in (
        None,
        table_of({"w": ("float32", (2, 4)), "b": ("bfloat16", (3,))}),
        table_of({"w": ("float32", (4, 2)), "c": ("bfloat16", (3,))}),
        table_of({"b": ("bfloat16", (3,)), "w": ("float32", (4, 2))}),
        table_of({"w": ("float16", (4, 2)), "b": ("bfloat16", (3,))}),
    ):
        back = PutBeginRequest.from_wire(wire, InvalidArgument, other)
        assert back.table is None and back.by_digest
    assert PutBeginReply.wants_table(PutBeginReply.wanting_table())
    assert not PutBeginReply.wants_table(PutBeginReply(7, np.zeros(2, np.int64), 512, {}).to_wire())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"table_digest": b"x" * 31}, "needs its table"),
        ({"device": 0}, "device"),
        ({"origin": "x" * (MAX_ORIGIN + 1)}, "origin"),
        ({"origin": 5}, "origin"),
        ({"name": "A B"}, "name"),
        ({"tensors": {"count": -1}}, "count"),
        ({"tensors": "w"}, "map"),
    ],
)
def test_malformed_put_begin_requests_are_invalid_arguments(change: dict, match: str) -> None:
    wire = {**PutBeginRequest("a", "cpu", TABLE).to_wire(), **change}
    with pytest.raises(InvalidArgument, match=match):
        PutBeginRequest.from_wire(wire, InvalidArgument)
    by_digest = PutBeginRequest("a", "cpu", TABLE, by_digest=True).to_wire()
    for digest in (b"x" * 31, "x" * 32, None):
        with pytest.raises(InvalidArgument, match="digest"):
            PutBeginRequest.from_wire({**by_digest, "table_digest": digest}, InvalidArgument, TABLE)


def test_malformed_put_begin_replies_are_protocol_errors() -> None:
    good = PutBeginReply(7, np.array([0, 256], dtype=np.int64), 512, {"kind": "host"}).to_wire()
    for bad in (None, {**good, "offsets": "x"}, {**good, "reservation": True}, {**good, "replica": None}):
        with pytest.raises(ProtocolError, match="malformed put_begin reply"):
            PutBeginReply.from_wire(bad, ProtocolError, 2)
    with pytest.raises(ProtocolError, match="one offset per tensor"):
        PutBeginReply.from_wire(good, ProtocolError, 3)
    assert PutBeginReply.reservation_of({**good, "offsets": "x"}) == 7  # still aborted
    assert PutBeginReply.reservation_of(None) is None


# -- publish --------------------------------------------------------------------------------------
def _published(n_blocks: int = 1) -> PublishedReplica:
    block = np.zeros(len(TABLE), dtype="<u4").tobytes()
    offset = np.array([0, 256], dtype="<u8").tobytes()
    return PublishedReplica("", "cuda:0", "h:1", (4096,) * n_blocks, (4096,) * n_blocks, block, offset, 0, 0)


def _owned() -> PublishedIpcReplica:
    p = _published()
    return PublishedIpcReplica(0, 0, 0, (b"h" * IPC_HANDLE_BYTES,), p.sizes, p.block, p.offset)


def _publish(**change: object) -> dict:
    fps = np.array([1, 2], dtype=np.uint64)
    return {**PublishRequest("a/b", TABLE, fps, 3, _owned(), _published(), "mine").to_wire(), **change}


def test_publish_round_trips_with_the_daemon_setting_node_and_size() -> None:
    wire = _publish()
    assert set(wire["replica"]) == {"device", "handles", "sizes", "block", "offset"}  # the publisher's form
    assert set(wire["exposed"]) == {"session", "device", "addresses", "sizes", "block", "offset"}
    back = PublishRequest.from_wire({"op": "publish", **wire}, InvalidArgument)
    _, nbytes = TABLE.layout()
    assert back.fingerprints.tolist() == [1, 2] and back.fp == 3 and back.origin == "mine"
    assert back.ipc == dataclasses.replace(_owned(), nbytes=nbytes)
    assert back.exposed == dataclasses.replace(_published(), nbytes=nbytes)
    only_host = {k: v for k, v in _publish().items() if k != "replica"}
    assert PublishRequest.from_wire(only_host, InvalidArgument).ipc is None
    assert PublishReply.from_wire(PublishReply(4).to_wire(), ProtocolError) == PublishReply(4)
    with pytest.raises(ProtocolError, match="malformed publish reply"):
        PublishReply.from_wire({"version": "4"}, ProtocolError)


def test_a_publish_names_a_known_table_by_its_digest() -> None:
    fps = np.array([1, 2], dtype=np.uint64)
    wire = PublishRequest("a/b", TABLE, fps, 3, _owned(), None, by_digest=True).to_wire()
    assert "tensors" not in wire and wire["table_digest"] == TABLE.digest
    back = PublishRequest.from_wire(wire, InvalidArgument, TABLE)
    assert back.table is TABLE and back.by_digest and back.fingerprints.tolist() == [1, 2]
    other = table_of({"x": ("uint8", (3,))})
    assert PublishRequest.from_wire(wire, InvalidArgument, other).table is None  # unknown: the daemon asks
    assert PublishRequest.from_wire(wire, InvalidArgument).table is None
    with pytest.raises(InvalidArgument, match="needs its table"):
        PublishRequest.from_wire({**wire, "tensors": TABLE.to_wire()}, InvalidArgument, TABLE)
    with pytest.raises(InvalidArgument, match="needs its table"):
        PublishRequest.from_wire({k: v for k, v in wire.items() if k != "table_digest"}, InvalidArgument)
    with pytest.raises(InvalidArgument, match="table_digest"):
        PublishRequest.from_wire({**wire, "table_digest": b"short"}, InvalidArgument, TABLE)


def _two_engines(**change: object) -> dict:
    """A publication registered with two engines (more allocations than one advertises)."""
    two = {**_published(2).to_wire(), "more_sessions": ["h:2"], "session_of": np.array([0, 1], "<u2").tobytes()}
    return {**two, **change}


def test_a_publication_over_several_engines_round_trips() -> None:
    wire = _two_engines()
    back = published_from_wire(wire, "n", 1, 2, ProtocolError)
    assert back.sessions()[0] == ("h:1", "h:2") and back.sessions()[1].tolist() == [0, 1]  # type: ignore[union-attr]
    assert published_from_wire(back.to_wire(), "n", 1, 2, ProtocolError) == back
    one = _published().to_wire()
    assert "more_sessions" not in one and "session_of" not in one  # one engine: the old form
    assert published_from_wire(one, "n", 1, 2, ProtocolError).sessions() == (("h:1",), None)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"more_sessions": "h:2"}, "more_sessions"),
        ({"more_sessions": ["nocolon"]}, "more_sessions"),
        ({"more_sessions": ["h:2"] * 1024}, "more_sessions"),
        ({"session_of": b""}, "one uint16 per allocation"),
        ({"session_of": b"\0\0\1"}, "one uint16 per allocation"),
        ({"session_of": [0, 1]}, "one uint16 per allocation"),
        ({"session_of": np.array([0, 2], "<u2").tobytes()}, "past its 2"),
    ],
)
def test_malformed_engine_lists_are_refused(change: dict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        published_from_wire(_two_engines(**change), "n", 1, 2, ProtocolError)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"replica": None, "exposed": None}, "needs an IPC export"),
        ({"replica": [1]}, "must be maps"),
        ({"fingerprints": b"\0" * 8}, "one little-endian uint64 per tensor"),
        ({"fp": 9}, "fingerprint definition"),
        ({"fp": True}, "fingerprint definition"),
        ({"origin": ["x"]}, "origin"),
        ({"extra": 1}, "unknown arguments"),
        ({"replica": {**_owned().to_wire(), "handles": [b"x"]}}, "IPC handle"),
        ({"exposed": {**_published().to_wire(), "session": "nocolon"}}, "session"),
        ({"exposed": {**_published(2).to_wire()}}, "same allocations"),
        ({"replica": {**_owned().to_wire(), "sizes": [100]}}, "past the end"),
    ],
)
def test_malformed_publish_requests_are_invalid_arguments(change: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        PublishRequest.from_wire(_publish(**change), InvalidArgument)


# -- the stream ops -------------------------------------------------------------------------------
def test_stream_open_round_trips() -> None:
    request = StreamOpenRequest("a/b", 2, "n1", MIN_CHUNK)
    assert StreamOpenRequest.from_wire({"op": "stream_open", **request.to_wire()}, InvalidArgument) == request
    held = np.array([True, False, True])
    reply = StreamOpenReply(5, MIN_CHUNK, 3, held, 1, "h:1", 4096, 3 * MIN_CHUNK, 9, "cpu")
    back = StreamOpenReply.from_wire(reply.to_wire(), ProtocolError)
    assert back.have is not None and back.have.tolist() == held.tolist() and not back.complete
    assert (back.pin, back.count, back.busy, back.session, back.address, back.nbytes) == (
        5,
        3,
        1,
        "h:1",
        4096,
        3 * MIN_CHUNK,
    )
    complete = StreamOpenReply.from_wire(dataclasses.replace(reply, have=None).to_wire(), ProtocolError)
    assert complete.complete and complete.have is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
        ({"node": ""}, "node"),
        ({"node": "x" * 65}, "node"),
        ({"chunk": MIN_CHUNK - 256}, "chunk"),
        ({"chunk": MIN_CHUNK + 1}, "chunk"),
        ({"name": "A B"}, "name"),
        ({"extra": 1}, "unknown"),
    ],
)
def test_malformed_stream_open_requests_are_invalid_arguments(change: dict, match: str) -> None:
    wire = {**StreamOpenRequest("a", 1, "n", MIN_CHUNK).to_wire(), **change}
    with pytest.raises(InvalidArgument, match=match):
        StreamOpenRequest.from_wire(wire, InvalidArgument)


def test_malformed_stream_open_replies_are_protocol_errors() -> None:
    good = StreamOpenReply(5, MIN_CHUNK, 16, np.zeros(16, bool), 0, "", 0, 1, 1, "cpu").to_wire()
    for bad in (None, {**good, "pin": "5"}, {**good, "count": -1}, {**good, "session": 3}, {**good, "have": b"\0"}):
        with pytest.raises(ProtocolError):
            StreamOpenReply.from_wire(bad, ProtocolError)


def _count(pin: object) -> int:
    if pin != 7:
        raise InvalidArgument(f"pin {pin!r} is no stream pin of this connection")
    return 16


def test_stream_chunks_round_trips() -> None:
    want = np.zeros(16, bool)
    want[[2, 9]] = True
    request = StreamChunksRequest(7, [1, 2], [2], want, 2, 3, [0], [4], 0.5, True, "cuda:1")
    back = StreamChunksRequest.from_wire({"op": "stream_chunks", **request.to_wire()}, InvalidArgument, _count)
    assert back.want is not None and back.want.tolist() == want.tolist()
    assert (back.pin, back.chunks, back.force, back.limit, back.start, back.done, back.declined) == (
        7,
        [1, 2],
        [2],
        2,
        3,
        [0],
        [4],
    )
    assert (back.wait, back.push, back.device) == (0.5, True, "cuda:1")
    assert StreamChunksRequest(7).to_wire() == {"pin": 7}  # is the holder still there
    reply = StreamChunksReply([1], {3: "n2"}, want, False, 2, False, True, 4096, 0)
    got = StreamChunksReply.from_wire(reply.to_wire(), ProtocolError, 16)
    assert (got.granted, got.redirect, got.busy, got.full, got.address, got.seq) == ([1], {3: "n2"}, 2, True, 4096, 0)
    assert got.have is not None and got.have.tolist() == want.tolist()
    assert StreamChunksReply.from_wire({"redirect": [[99, "n"]]}, ProtocolError, 16).redirect == {}  # off the grid
    assert StreamChunksReply.from_wire(StreamChunksReply(gone=True).to_wire(), ProtocolError, 16).gone


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"pin": 8}, "no stream pin"),
        ({"pin": "7"}, "no stream pin"),
        ({"chunks": [16]}, "chunks must hold"),
        ({"chunks": list(range(17))}, "at most 16"),
        ({"force": [-1]}, "force"),
        ({"done": "x"}, "done"),
        ({"declined": [1.5]}, "declined"),
        ({"want": b"\0", "limit": 1}, "bitmap"),
        ({"want": [1], "limit": 1}, "bitmap"),
        ({"want": b"\0\0", "limit": 0}, "limit"),
        ({"want": b"\0\0", "limit": 17}, "limit"),
        ({"start": 16}, "start"),
        ({"wait": MAX_WAIT + 1}, "wait"),
        ({"wait": "1"}, "wait"),
        ({"push": 1, "device": "cpu"}, "push"),
        ({"push": True, "device": "gpu"}, "device"),
        ({"push": True}, "device"),
        ({"other": 1}, "unknown"),
    ],
)
def test_malformed_stream_chunks_requests_are_invalid_arguments(change: dict, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        StreamChunksRequest.from_wire({"pin": 7, **change}, InvalidArgument, _count)


def test_malformed_stream_chunks_replies_are_protocol_errors() -> None:
    for bad in (None, {"granted": [16]}, {"redirect": [[1]]}, {"have": b"\0"}, {"busy": -1}, {"seq": "1"}):
        with pytest.raises(ProtocolError):
            StreamChunksReply.from_wire(bad, ProtocolError, 16)


def test_stream_pair_round_trips() -> None:
    request = StreamPairRequest("n1", "10.0.0.1", 29500, "tensord/x", "gloo", "cpu", "cuda:0")
    assert StreamPairRequest.from_wire({"op": "stream_pair", **request.to_wire()}, InvalidArgument) == request
    assert StreamPairReply.from_wire(StreamPairReply(1.5).to_wire(), ProtocolError) == StreamPairReply(1.5)
    with pytest.raises(ProtocolError, match="malformed stream_pair reply"):
        StreamPairReply.from_wire({"seconds": "1"}, ProtocolError)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"host": 1}, "strings"),
        ({"key": "k" * 201}, "strings"),
        ({"port": 0}, "port"),
        ({"port": True}, "port"),
        ({"backend": "mpi"}, "backend"),
        ({"backend": ["gloo"]}, "backend"),
        ({"device": "tpu"}, "devices"),
        ({"to": None}, "devices"),
    ],
)
def test_malformed_stream_pair_requests_are_invalid_arguments(change: dict, match: str) -> None:
    wire = {**StreamPairRequest("n1", "h", 1, "k", "gloo", "cpu", "cpu").to_wire(), **change}
    with pytest.raises(InvalidArgument, match=match):
        StreamPairRequest.from_wire(wire, InvalidArgument)


# -- the scalar ops: release, put_commit, delete, unpublish, replicate -----------------------------
def test_release_round_trips_and_a_pin_that_is_no_int_names_none() -> None:
    assert ReleaseRequest.from_wire({"op": "release", **ReleaseRequest(7).to_wire()}, InvalidArgument).pin == 7
    for odd in ([1], "7", True, None, 1.0):  # no pin of this connection: the daemon answers released False
        assert ReleaseRequest.from_wire({"pin": odd}, InvalidArgument).pin is None
    for bad in ({}, {"pin": 1, "clean": True}):
        with pytest.raises(InvalidArgument, match="arguments"):
            ReleaseRequest.from_wire(bad, InvalidArgument)
    reply = ReleaseReply(True, False)
    assert ReleaseReply.from_wire(reply.to_wire(), ProtocolError) == reply
    assert ReleaseReply.from_wire({"released": True}, ProtocolError) == ReleaseReply(True, True)  # before `intact`
    for bad_reply in (None, [], {"released": 1, "intact": True}, {"released": True, "intact": "no"}, {}):
        with pytest.raises(ProtocolError, match="malformed release reply"):
            ReleaseReply.from_wire(bad_reply, ProtocolError)


def test_put_commit_round_trips_the_fingerprints() -> None:
    fps = np.array([1, 2**64 - 1, 0], dtype=np.uint64)
    request = PutCommitRequest.of(4, fps, 3)
    decoded = PutCommitRequest.from_wire({"op": "put_commit", **request.to_wire()}, InvalidArgument)
    assert decoded == request and decoded.values().dtype == np.uint64
    np.testing.assert_array_equal(decoded.values(), fps)
    assert PutCommitRequest.from_wire({"reservation": 4, "fingerprints": b""}, InvalidArgument).fp == 2  # older clients
    assert PutCommitReply.from_wire(PutCommitReply(9).to_wire(), ProtocolError) == PutCommitReply(9)
    for bad_reply in (None, {}, {"version": 0}, {"version": "9"}, {"version": True}):
        with pytest.raises(ProtocolError, match="malformed put_commit reply"):
            PutCommitReply.from_wire(bad_reply, ProtocolError)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"reservation": {"a": 1}}, "reservation"),
        ({"reservation": True}, "reservation"),
        ({"fingerprints": []}, "fingerprints"),
        ({"fingerprints": bytes(7)}, "fingerprints"),
        ({"fingerprints": "x" * 8}, "fingerprints"),
        ({"fp": 1}, "fp must name"),
        ({"fp": "3"}, "fp must name"),
        ({"fp": True}, "fp must name"),
        ({"fingerprints": None, "extra": 1}, "unknown arguments"),
    ],
)
def test_malformed_put_commit_requests_are_invalid_arguments(change: dict, match: str) -> None:
    wire = {**PutCommitRequest(1, bytes(8), 3).to_wire(), **change}
    with pytest.raises(InvalidArgument, match=match):
        PutCommitRequest.from_wire(wire, InvalidArgument)


def test_delete_round_trips_and_refuses_what_is_not_a_version() -> None:
    for request in (DeleteRequest("a/b", 3), DeleteRequest("a/b")):
        assert DeleteRequest.from_wire({"op": "delete", **request.to_wire()}, InvalidArgument) == request
    for bad, match in (
        ({}, "missing arguments"),
        ({"name": 5}, "set name"),
        ({"name": "A B"}, "name"),
        ({"name": "a", "version": "latest"}, "version"),
        ({"name": "a", "version": 0}, "version"),
        ({"name": "a", "version": True}, "version"),
        ({"name": "a", "all": True}, "unknown arguments"),
    ):
        with pytest.raises(InvalidArgument, match=match):
            DeleteRequest.from_wire(bad, InvalidArgument)
    assert DeleteReply.from_wire(DeleteReply(0).to_wire(), ProtocolError) == DeleteReply(0)
    for bad_reply in (None, {}, {"deleted": -1}, {"deleted": "2"}, {"deleted": False}):
        with pytest.raises(ProtocolError, match="malformed delete reply"):
            DeleteReply.from_wire(bad_reply, ProtocolError)


def test_unpublish_round_trips_and_refuses_bad_timeouts_and_versions() -> None:
    for request in (UnpublishRequest("a/b", 2, 0.5), UnpublishRequest("a/b", 2)):
        assert UnpublishRequest.from_wire({"op": "unpublish", **request.to_wire()}, InvalidArgument) == request
    assert "timeout" not in UnpublishRequest("a/b", 2).to_wire()
    for bad, match in (
        ({"name": "a"}, "missing arguments"),
        ({"name": "a", "version": None}, "needs the version"),
        ({"name": "a", "version": "latest"}, "version"),
        ({"name": "a", "version": 1, "timeout": -1}, "timeout"),
        ({"name": "a", "version": 1, "timeout": MAX_WAIT + 1}, "timeout"),
        ({"name": "a", "version": 1, "timeout": True}, "timeout"),
        ({"name": "a", "version": 1, "timeout": "1"}, "timeout"),
        ({"name": ["a"], "version": 1}, "set name"),
    ):
        with pytest.raises(InvalidArgument, match=match):
            UnpublishRequest.from_wire(bad, InvalidArgument)
    reply = UnpublishReply(False, 2)
    assert UnpublishReply.from_wire(reply.to_wire(), ProtocolError) == reply
    for bad_reply in (None, {"drained": True}, {"drained": 1, "pins": 0}, {"drained": True, "pins": -1}):
        with pytest.raises(ProtocolError, match="malformed unpublish reply"):
            UnpublishReply.from_wire(bad_reply, ProtocolError)


def test_replicate_round_trips_each_form() -> None:
    forms = [
        ReplicateRequest("a/b"),
        ReplicateRequest("a/b", 3, "cuda:0", "n2", rate=0, chunk=MIN_CHUNK),
        ReplicateRequest("a/b", None, None, ("n1", "n2")),
        ReplicateRequest("a/b", 3, to="all", rate=10),
        ReplicateRequest("a/b", 3, index=1, of=2, peers=("n1", "n2")),
    ]
    for request in forms:
        assert ReplicateRequest.from_wire({"op": "replicate", **request.to_wire()}, InvalidArgument) == request
    assert [r.fan_out for r in forms] == [False, False, True, True, False]
    assert forms[4].place == {"index": 1, "of": 2, "peers": ["n1", "n2"]} and forms[0].place == {}
    assert ReplicateRequest("a/b").to_wire() == {"name": "a/b", "version": None}
    # a target of a fan-out from a daemon that names no peers: none
    assert ReplicateRequest.from_wire({"name": "a", "index": 0, "of": 1}, InvalidArgument).peers == ()
    assert ReplicateRequest.from_wire({"name": "a", "version": "latest"}, InvalidArgument).version is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": None}, "set name"),
        ({"name": "A B"}, "name"),
        ({"version": 0}, "version"),
        ({"device": 0}, "device"),
        ({"rate": -1}, "rate"),
        ({"rate": True}, "rate"),
        ({"chunk": MIN_CHUNK - 256}, "chunk"),
        ({"chunk": MIN_CHUNK + 1}, "chunk"),
        ({"to": 5}, "to must be"),
        ({"to": ["n1", 2]}, "to must be"),
        ({"index": 1}, "index and of"),
        ({"index": 2, "of": 2}, "index and of"),
        ({"index": 0, "of": MAX_FAN_OUT + 1}, "index and of"),
        ({"index": True, "of": 2}, "index and of"),
        ({"index": 0, "of": 2, "peers": "n1"}, "peers"),
        ({"peers": ["n1"]}, "index and of"),
        ({"from": "n1"}, "unknown arguments"),
    ],
)
def test_malformed_replicate_requests_are_invalid_arguments(change: dict, match: str) -> None:
    wire = {**ReplicateRequest("a/b", 2).to_wire(), **change}
    with pytest.raises(InvalidArgument, match=match):
        ReplicateRequest.from_wire(wire, InvalidArgument)


def test_replicate_replies_round_trip_and_malformed_ones_are_protocol_errors() -> None:
    plain = ReplicateReply("n1", "a/b", 2, "cpu")
    assert plain.to_wire() == {"node": "n1", "name": "a/b", "version": 2, "device": "cpu"}
    target = ReplicateReply("n1", "a/b", 2, "cuda:0", 1.5, {"n2": 4096}, {"fetch": 1.2}, MIN_CHUNK)
    for reply in (plain, target):
        assert ReplicateReply.from_wire({**reply.to_wire(), "later": 1}, ProtocolError) == reply
    for bad_reply in (
        None,
        {"node": "n1", "name": "a/b", "version": 2},
        {"node": "n1", "name": "a/b", "version": "2", "device": "cpu"},
        {**plain.to_wire(), "seconds": "1"},
        {**plain.to_wire(), "chunk": 0},
        {**plain.to_wire(), "sources": [1]},
    ):
        with pytest.raises(ProtocolError, match="malformed replicate reply"):
            ReplicateReply.from_wire(bad_reply, ProtocolError)


# -- the catalogue's ops and what a node says of itself -------------------------------------------
def test_hello_round_trips_and_a_client_that_is_no_string_goes_unnamed() -> None:
    request = HelloRequest(2, "pid:7", "secret")
    assert HelloRequest.from_wire({"op": "hello", **request.to_wire()}, InvalidArgument) == request
    assert HelloRequest(2, "pid:7").to_wire() == {"protocol": 2, "client": "pid:7"}  # no token: none sent
    assert HelloRequest.from_wire({"protocol": 2, "client": 5}, InvalidArgument) == HelloRequest(2)
    for bad in ({}, {"protocol": 2, "user": "x"}):
        with pytest.raises(InvalidArgument, match="arguments"):
            HelloRequest.from_wire(bad, InvalidArgument)
    reply = HelloReply(2, "n1", "0.1", {"protocol": "tcp"}, True)
    assert HelloReply.from_wire({**reply.to_wire(), "later": 1}, ProtocolError) == reply
    older = {k: v for k, v in reply.to_wire().items() if k != "cluster"}  # a daemon before `cluster`
    assert HelloReply.from_wire(older, ProtocolError) == dataclasses.replace(reply, cluster=False)
    for bad_reply in (None, [], {**reply.to_wire(), "node": 5}, {**reply.to_wire(), "cluster": None}):
        with pytest.raises(ProtocolError, match="malformed hello reply"):
            HelloReply.from_wire(bad_reply, ProtocolError)


def test_ls_round_trips_and_refuses_bad_prefixes_and_entries() -> None:
    assert LsRequest.from_wire({"op": "ls", **LsRequest("a/").to_wire()}, InvalidArgument) == LsRequest("a/")
    assert LsRequest.from_wire({}, InvalidArgument) == LsRequest("")
    for bad, match in (({"prefix": 5}, "prefix"), ({"prefix": "A B"}, "bad name"), ({"name": "a"}, "unknown")):
        with pytest.raises(InvalidArgument, match=match):
            LsRequest.from_wire(bad, InvalidArgument)
    entry = LsEntry("a/b", 3, [1, 3], 4096, 2, "/ck/m.safetensors", "n1:cpu")
    reply = LsReply((entry, dataclasses.replace(entry, name="c", origin=None, device=None)))
    assert LsReply.from_wire([{**e, "later": 1} for e in reply.to_wire()], ProtocolError) == reply
    good = entry.to_wire()
    for bad_reply in ({}, [None], [{**good, "latest": 0}], [{**good, "versions": [1, "2"]}], [{**good, "nbytes": -1}]):
        with pytest.raises(ProtocolError, match="malformed ls reply"):
            LsReply.from_wire(bad_reply, ProtocolError)


def _info(**change: object) -> InfoReply:
    reply = InfoReply(
        "a/b", 2, 3, [2, 3], 2, {"float32": 2}, 40, 512, 1.5e9, None, "cpu", 1, False, 0, None, False,
        [{"name": "a/b", "version": 2, "node": "n1", "device": "cpu"}], [PartialInfo("n2", "cpu", 3, 8, MIN_CHUNK)],
    )  # fmt: skip
    return dataclasses.replace(reply, **change)


def test_info_round_trips_with_rows_columns_or_neither() -> None:
    for tensors in (False, True, "columns"):
        request = InfoRequest("a/b", 2, tensors)
        assert InfoRequest.from_wire({"op": "info", **request.to_wire()}, InvalidArgument) == request
    assert InfoRequest("a").to_wire() == {"name": "a", "version": None}
    for bad, match in (
        ({"name": 5}, "set name"),
        ({"name": "a", "tensors": "rows"}, "tensors"),
        ({"name": "a", "version": 0}, "version"),
        ({"name": "a", "pins": 1}, "unknown"),
    ):
        with pytest.raises(InvalidArgument, match=match):
            InfoRequest.from_wire(bad, InvalidArgument)
    for reply in (_info(), _info(tensors={"count": 2, "names": b"w"}), _info(tensors={"w": {"dtype": "float32"}})):
        assert InfoReply.from_wire({**reply.to_wire(), "later": 1}, ProtocolError) == reply
    assert "tensors" not in _info().to_wire()
    assert (
        InfoReply.from_wire({k: v for k, v in _info().to_wire().items() if k != "partials"}, ProtocolError).partials
        == []
    )
    good = _info().to_wire()
    for bad_reply in (
        None,
        {**good, "pins": -1},
        {**good, "dtypes": {"f": "2"}},
        {**good, "lost": 1},
        {**good, "partials": [{"node": "n2"}]},
        {**good, "tensors": "all"},
        {**good, "replicas": [1]},
    ):
        with pytest.raises(ProtocolError, match="malformed info reply"):
            InfoReply.from_wire(bad_reply, ProtocolError)


def test_wait_round_trips_and_refuses_what_is_no_version_or_no_timeout() -> None:
    for request in (WaitRequest("a", 0), WaitRequest("a", 7, 2.5)):
        assert WaitRequest.from_wire({"op": "wait", **request.to_wire()}, InvalidArgument) == request
    for change, match in (
        ({"after": -1}, "after"),
        ({"after": True}, "after"),
        ({"timeout": MAX_WAIT + 1}, "timeout"),
        ({"timeout": "1"}, "timeout"),
        ({"name": None}, "set name"),
        ({"at": 1}, "unknown"),
    ):
        with pytest.raises(InvalidArgument, match=match):
            WaitRequest.from_wire({"name": "a", "after": 1, **change}, InvalidArgument)
    with pytest.raises(InvalidArgument, match="missing"):
        WaitRequest.from_wire({"name": "a"}, InvalidArgument)
    for reply in (WaitReply(None), WaitReply(4)):
        assert WaitReply.from_wire({**reply.to_wire(), "later": 1}, ProtocolError) == reply
    for bad_reply in (None, {"version": 0}, {"version": "4"}):
        with pytest.raises(ProtocolError, match="malformed wait reply"):
            WaitReply.from_wire(bad_reply, ProtocolError)


def _status(**change: object) -> StatusReply:
    reply = StatusReply(
        "n1", "0.1", 3.5, "", None, {"cpu": {"limit": 1 << 30, "used": 0}}, 0, 1, 1, 0, 0, "none", 0, [], None,
        {"bytes": 0}, [], None, {"kind": "local"}, [{"name": "a", "done": 1, "total": 2}],
    )  # fmt: skip
    return dataclasses.replace(reply, **change)


def test_status_and_nodes_round_trip_and_type_the_top_level() -> None:
    assert StatusRequest.from_wire({"op": "status"}, InvalidArgument) == StatusRequest()
    assert NodesRequest.from_wire({"op": "nodes"}, InvalidArgument) == NodesRequest()
    for request in (StatusRequest, NodesRequest):
        with pytest.raises(InvalidArgument, match="unknown"):
            request.from_wire({"verbose": True}, InvalidArgument)  # type: ignore[attr-defined]
    reply = _status()
    assert StatusReply.from_wire({**reply.to_wire(), "later": 1}, ProtocolError) == reply
    good = reply.to_wire()
    for bad_reply in (
        None,
        {**good, "pins": "0"},
        {**good, "devices": []},
        {**good, "loads": [1]},
        {k: v for k, v in good.items() if k != "registry"},
    ):
        with pytest.raises(ProtocolError, match="malformed status reply"):
            StatusReply.from_wire(bad_reply, ProtocolError)
    nodes = NodesReply(
        (NodeEntry("n1", "h", "tcp:h:1", "", {"cpu": 1 << 30}, reply), NodeEntry("n2", "h", "", "", {}, None))
    )
    assert NodesReply.from_wire(nodes.to_wire(), ProtocolError) == nodes
    assert nodes.to_wire()[0]["status"]["node"] == "n1" and nodes.to_wire()[1]["status"] is None
    for bad_reply in ({}, [{"node": "n1"}], [{**nodes.to_wire()[0], "devices": {"cpu": -1}}]):
        with pytest.raises(ProtocolError, match="malformed nodes reply"):
            NodesReply.from_wire(bad_reply, ProtocolError)
    with pytest.raises(ProtocolError, match="malformed status reply"):  # a node's status is checked too
        NodesReply.from_wire([{**nodes.to_wire()[0], "status": {"node": "n1"}}], ProtocolError)


def test_put_abort_round_trips_and_needs_its_reservation() -> None:
    assert (
        PutAbortRequest.from_wire({"op": "put_abort", **PutAbortRequest(3).to_wire()}, InvalidArgument).reservation == 3
    )
    for bad in ({}, {"reservation": 3, "pin": 1}):
        with pytest.raises(InvalidArgument, match="arguments"):
            PutAbortRequest.from_wire(bad, InvalidArgument)
    assert PutAbortReply.from_wire({"later": 1}, ProtocolError) == PutAbortReply()
    with pytest.raises(ProtocolError, match="malformed put_abort reply"):
        PutAbortReply.from_wire(None, ProtocolError)


def test_load_round_trips_each_form() -> None:
    files = (PassedFile("/ck/a.safetensors", 10, 123), PassedFile("/ck/b.safetensors", 0, -5))
    forms = [
        LoadRequest("/ck", "a/b"),
        LoadRequest("/ck", "a/b", "cuda:0", 4),
        LoadRequest("/ck", "a/b", files=files, tp=2, rules={"rules": []}),
    ]
    for request in forms:
        assert LoadRequest.from_wire({"op": "load", **request.to_wire()}, InvalidArgument) == request
    reply = LoadReply(3, 4096, [("a/tp0", 3), ("a/tp1", 1)])
    assert LoadReply.from_wire({**reply.to_wire(), "later": 1}, ProtocolError) == reply
    for bad_reply in (
        None,
        {"version": 0, "nbytes": 1, "sets": [["a", 1]]},
        {"version": 1, "nbytes": 1, "sets": []},
        {"version": 1, "nbytes": 1, "sets": [["a", "1"]]},
    ):
        with pytest.raises(ProtocolError, match="malformed load reply"):
            LoadReply.from_wire(bad_reply, ProtocolError)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": None}, "name"),
        ({"path": ""}, "path"),
        ({"path": "/a\0b"}, "path"),
        ({"device": 0}, "device"),
        ({"threads": 0}, "threads"),
        ({"threads": True}, "threads"),
        ({"tp": 2}, "rules"),
        ({"rules": {}}, "tp"),
        ({"tp": 2, "rules": []}, "rules"),
        ({"files": []}, "files"),
        ({"files": "a"}, "files"),
        ({"files": [{"path": "", "size": 1, "mtime_ns": 1}]}, "path"),
        ({"files": [{"path": "a" * 4097, "size": 1, "mtime_ns": 1}]}, "path"),
        ({"files": [{"path": "a", "size": -1, "mtime_ns": 1}]}, "size"),
        ({"files": [{"path": "a", "size": 1, "mtime_ns": 1.5}]}, "mtime_ns"),
        ({"files": [{"path": "a", "size": 1, "mtime_ns": 1}] * 2}, "distinct"),
        ({"from": "x"}, "unknown arguments"),
    ],
)
def test_malformed_load_requests_are_invalid_arguments(change: dict, match: str) -> None:
    wire = {**LoadRequest("/ck", "a/b").to_wire(), **change}
    with pytest.raises(InvalidArgument, match=match):
        LoadRequest.from_wire(wire, InvalidArgument)


def test_a_fan_out_reply_round_trips_with_the_nodes_that_held_it_already() -> None:
    pulled = ReplicateReply("n2", "a/b", 2, "cpu", 1.5, {"n1": 4096}, {"fetch": 1.0}, MIN_CHUNK)
    reply = FanOutReply("a/b", 2, {"n2": pulled}, 2.0, held=("n1",))
    wire = reply.to_wire()
    assert wire["nodes"]["n1"] == {"node": "n1", "held": True} and wire["nodes"]["n2"]["seconds"] == 1.5
    assert FanOutReply.from_wire({**wire, "later": 1}, ProtocolError) == reply
    for bad_reply in (
        None,
        {**wire, "version": 0},
        {**wire, "seconds": None},
        {**wire, "nodes": {"n3": {"node": "n3"}}},
        {**wire, "nodes": {"n3": pulled.to_wire()}},
    ):
        with pytest.raises(ProtocolError, match="malformed replicate reply"):
            FanOutReply.from_wire(bad_reply, ProtocolError)
