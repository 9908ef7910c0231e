"""Bad input from outside gets a clear error, changes nothing, and the daemon keeps serving."""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np
import pytest
import torch

import sdk
from tensord_contract import wire
from tensord_contract.manifest import Table
from tensord_contract.names import check_name
from tests.frames import Raw, code


@pytest.fixture(autouse=True)
def _daemon_unharmed(daemon):
    """After every test here: the store is as it was and the daemon still serves."""
    with daemon.client() as c:
        before = (c.ls(), c.status()["devices"], c.status()["reservations"])
    yield
    with daemon.client() as c:
        assert (c.ls(), c.status()["devices"], c.status()["reservations"]) == before
        assert c.put("probe", {"x": torch.ones(1)}) >= 1
        c.delete("probe")


BAD_NAMES = ["", "Upper", "a//b", "/a", "a/", "a/../b", "..", ".", "a b", "a\x00b", "é", "x" * 256, 7, None]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_by_sdk_and_daemon(raw: Raw, client: sdk.Client, name: Any) -> None:
    with pytest.raises(sdk.InvalidArgument):
        check_name(name)
    for op, args in (
        ("open", {}),
        ("info", {}),
        ("delete", {}),
        ("put_begin", {"device": "cpu", "tensors": []}),
        ("unpublish", {"version": 1}),
        ("replicate", {}),
    ):
        assert code(raw.call(op, name=name, **args)) == "invalid_argument"
    if isinstance(name, str):
        with pytest.raises(sdk.InvalidArgument):
            client.put(name, {"x": torch.ones(1)})


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("release", {}),
        ("release", {"pin": 1, "clean": True}),
        ("delete", {"name": "a", "version": "latest"}),
        ("delete", {"name": "a", "version": True}),
        ("unpublish", {"name": "a", "version": None}),
        ("unpublish", {"name": "a", "version": 1, "timeout": -1}),
        ("replicate", {"name": "a", "chunk": 1}),
        ("replicate", {"name": "a", "to": 5}),
        ("replicate", {"name": "a", "index": 3, "of": 2}),
        ("replicate", {"name": "a", "rate": True}),
        ("put_commit", {"reservation": 1, "fingerprints": bytes(8), "fp": "3"}),
    ],
)
def test_scalar_ops_refuse_bad_arguments_before_anything_else(raw: Raw, op: str, args: dict[str, Any]) -> None:
    """Decoded by their typed messages first: refused as the caller's fault even where the op
    could not run here anyway (no cluster to replicate in, nothing published)."""
    assert code(raw.call(op, **args)) == "invalid_argument"


def test_releasing_what_is_no_pin_of_the_connection_says_so(raw: Raw) -> None:
    for pin in (12345, "7", [1]):
        assert raw.call("release", pin=pin)["result"] == {"released": False, "intact": False}


def test_longest_valid_name_works(client: sdk.Client) -> None:
    name = "a/" * 126 + "abc"
    assert len(name) == 255
    assert client.put(name, {"x": torch.ones(1)}) == 1
    client.delete(name)


def _i64(*values: int) -> bytes:
    return np.array(values, dtype="<i8").tobytes()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: "nope",
        lambda t: [["x", "float32", [1]]],
        lambda t: {k: v for k, v in t.items() if k != "dims"},
        lambda t: {**t, "count": -1},
        lambda t: {**t, "count": 1.0},
        lambda t: {**t, "count": 3},
        lambda t: {**t, "count": 10**6},
        lambda t: {**t, "names": "x\0y"},
        lambda t: {**t, "names": b"x\0x"},
        lambda t: {**t, "names": b"\0y"},
        lambda t: {**t, "names": b"x\0y\0z"},
        lambda t: {**t, "names": b"x\0\xff"},
        lambda t: {**t, "dtypes": bytes([0, 200])},
        lambda t: {**t, "dtypes": bytes([0])},
        lambda t: {**t, "dims": _i64(-1, 2)},
        lambda t: {**t, "dims": _i64(2**50, 2)},
        lambda t: {**t, "dims": _i64(2)},
        lambda t: {**t, "ndims": bytes([17, 1]), "dims": _i64(*[1] * 18)},
        lambda t: {**t, "ndims": bytes([3, 3]), "dims": _i64(*[2**40] * 6)},
    ],
)
def test_bad_tensor_tables(raw: Raw, mutate: Any) -> None:
    table = _table(x=[2], y=[2])
    assert code(raw.call("put_begin", name="bad-spec", device="cpu", tensors=mutate(table))) == "invalid_argument"
    assert raw.call("status")["result"]["reservations"] == 0


@pytest.mark.parametrize("device", ["gpu", "cuda:99", "", 3, "cpu:0"])
def test_bad_devices(raw: Raw, device: Any) -> None:
    reply = raw.call("put_begin", name="bad-device", device=device, tensors=_table(x=[1]))
    assert code(reply) == "invalid_argument"


@pytest.mark.parametrize("version", [0, -1, "2", 1.0, True, "latest!"])
def test_bad_versions(raw: Raw, client: sdk.Client, version: Any) -> None:
    client.put("bad-version", {"x": torch.ones(1)})
    assert code(raw.call("open", name="bad-version", version=version)) == "invalid_argument"
    client.delete("bad-version")


def test_unknown_op_wrong_args_and_no_hello(daemon, raw: Raw) -> None:
    assert code(raw.call("format_disk")) == "invalid_argument"
    assert code(raw.call("ls", prefix=5)) == "invalid_argument"
    assert code(raw.call("ls", bogus=1)) == "invalid_argument"
    assert code(raw.call("info")) == "invalid_argument"
    raw.send({"id": "x", "op": "ls", "args": {}})
    assert code(raw.recv()) == "protocol_error"
    raw.send({"id": 2, "op": "ls", "args": [1]})
    assert code(raw.recv()) == "invalid_argument"
    raw.send([1, 2, 3])
    assert code(raw.recv()) == "protocol_error"
    fresh = Raw(daemon.socket, hello=False)
    assert code(fresh.call("ls")) == "protocol_error"
    assert code(fresh.call("hello", protocol=99)) == "protocol_error"
    fresh.close()


def test_garbage_frames_get_an_error_and_the_connection_survives(raw: Raw) -> None:
    raw.send_bytes(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    assert code(raw.recv()) == "protocol_error"
    assert raw.call("ls")["ok"]


def test_oversized_frame_closes_the_connection(raw: Raw) -> None:
    raw.send_bytes(struct.pack(">I", wire.MAX_FRAME + 1))
    assert code(raw.recv()) == "protocol_error"
    assert raw.recv() is None  # closed


def test_truncated_frame_then_disconnect(daemon) -> None:
    r = Raw(daemon.socket)
    r.send_bytes(struct.pack(">I", 100) + b"\x80" * 10)
    r.close()


def test_disconnect_in_the_middle_of_a_put_releases_the_reservation(daemon) -> None:
    r = Raw(daemon.socket)
    reply = r.call("put_begin", name="abandoned", device="cpu", tensors=_table(x=[1 << 20]))
    assert reply["ok"], reply
    with daemon.client() as c:
        assert c.status()["reservations"] == 1
        r.close()
        for _ in range(200):
            if c.status()["reservations"] == 0:
                break
            import time

            time.sleep(0.01)
        assert c.status()["reservations"] == 0
        with pytest.raises(sdk.NotFound):
            c.info("abandoned")


def _table(**shapes: list[int]) -> dict:
    """A put's tensor table on the wire: float32 tensors of these shapes."""
    return Table.build(list(shapes), ["float32"] * len(shapes), list(shapes.values())).to_wire()


def test_commit_checks_fingerprints_and_ownership(daemon, raw: Raw) -> None:
    reply = raw.call("put_begin", name="owned", device="cpu", tensors=_table(x=[4]))
    rid = reply["result"]["reservation"]
    for fps in (b"", bytes(16), bytes(7), [1], ["x"], -1, True, 1.5, None):
        assert code(raw.call("put_commit", reservation=rid, fingerprints=fps)) == "invalid_argument"
    for fp in (1, 4, "3", True, 3.0, [3]):  # the fingerprint definition must be one this daemon knows
        assert code(raw.call("put_commit", reservation=rid, fingerprints=bytes(8), fp=fp)) == "invalid_argument"
    other = Raw(daemon.socket)
    assert code(other.call("put_commit", reservation=rid, fingerprints=bytes(8))) == "invalid_argument"
    assert code(other.call("put_abort", reservation=rid)) == "invalid_argument"
    other.close()
    assert raw.call("put_abort", reservation=rid)["ok"]


def test_put_of_non_tensors_is_refused(client: sdk.Client) -> None:
    for bad in ({"x": [1, 2]}, {1: torch.ones(1)}, [torch.ones(1)]):
        with pytest.raises(sdk.InvalidArgument):
            client.put("not-tensors", bad)  # type: ignore[arg-type]


def _not_strided() -> list[torch.Tensor]:
    eye = torch.eye(3)
    return [eye.to_sparse(), eye.to_sparse_csr(), eye.to_sparse_csc(), torch.nested.nested_tensor([eye[0], eye[1, :2]])]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's beta and prototype layouts say so
@pytest.mark.parametrize("which", range(4))
def test_tensors_without_plain_memory_are_refused_by_every_op(client: sdk.Client, which: int) -> None:
    """Sparse (COO, CSR, CSC) and nested tensors: InvalidArgument naming the op's tensors, not
    torch's RuntimeError from deep inside, and nothing stored or written."""
    bad = {"x": _not_strided()[which]}
    with pytest.raises(sdk.InvalidArgument, match=r"tensors must be dense \(strided\)"):
        client.put("not-strided", bad)
    with pytest.raises(sdk.InvalidArgument, match=r"tensors must be dense \(strided\)"):
        client.publish("not-strided", bad)
    client.put("strided", {"x": torch.ones(3, 3)})
    with pytest.raises(sdk.InvalidArgument, match=r"targets must be dense \(strided\)"):
        client.load_into(bad, "strided")
    client.delete("strided")


@pytest.mark.parametrize("device", ["junk", "mps", "meta", "cuda:99", 0, object()])
def test_get_to_a_device_that_is_not_there_is_refused_before_reading(client: sdk.Client, device: Any) -> None:
    client.put("device-check", {"x": torch.ones(2)})
    pins = client.status()["pins"]
    with pytest.raises(sdk.InvalidArgument, match="device"):
        client.get("device-check", device=device)
    assert client.status()["pins"] == pins
    client.delete("device-check")


@pytest.mark.parametrize("flag", ["yes", 1, 0.0, [True]])
def test_flags_that_are_not_bools_are_refused(client: sdk.Client, flag: Any) -> None:
    client.put("flags", {"x": torch.ones(2)})
    target = {"x": torch.zeros(2)}
    with pytest.raises(sdk.InvalidArgument, match="verify must be"):
        client.get("flags", verify=flag)
    with pytest.raises(sdk.InvalidArgument, match="verify must be"):
        client.load_into(target, "flags", verify=flag)
    with pytest.raises(sdk.InvalidArgument, match="strict must be"):
        client.load_into(target, "flags", strict=flag)
    with pytest.raises(sdk.InvalidArgument, match="tensors must be"):
        client.info("flags", tensors=flag)
    assert not torch.any(target["x"])
    client.delete("flags")


def test_load_into_mismatch_changes_nothing(client: sdk.Client) -> None:
    client.put("shape-check", {"a": torch.ones(2, 3), "b": torch.ones(4)})
    cases = [
        {"a": torch.zeros(3, 2), "b": torch.zeros(4)},  # shape
        {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(4)},  # dtype
        {"a": torch.zeros(2, 3)},  # missing in target (strict)
        {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)},  # not in the set
    ]
    for target in cases:
        with pytest.raises(sdk.InvalidArgument):
            client.load_into(target, "shape-check")
        assert all(not t.any() for t in target.values())
    assert client.status()["pins"] == 0
    client.delete("shape-check")


def test_closed_client_refuses_reuse(daemon) -> None:
    c = daemon.client()
    c.ls()
    c.close()
    with pytest.raises(sdk.TensordError):
        c.ls()


def test_no_daemon_is_unavailable(tmp_path) -> None:
    with pytest.raises(sdk.Unavailable):
        sdk.Client(str(tmp_path / "none.sock")).ls()


def test_a_slab_the_client_cannot_open_gives_its_pin_back(client: sdk.Client, monkeypatch) -> None:
    """When the client fails after the daemon pinned a version (here: the slab file is shorter
    than the daemon says), the pin and the descriptor are given back."""
    client.put("bad/slab", {"x": torch.arange(10)})

    def short(fd: int, nbytes: int) -> int:
        raise sdk.ProtocolError(f"slab file holds 0 bytes, the slab needs {nbytes}")

    monkeypatch.setattr("tensord_dataplane.host.map_size", short)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(sdk.ProtocolError, match="slab file holds"):
        client.get("bad/slab")
    assert len(os.listdir("/proc/self/fd")) == fds_before
    monkeypatch.undo()
    assert client.info("bad/slab")["pins"] == 0
    assert torch.equal(client.get("bad/slab")["x"], torch.arange(10))
    client.delete("bad/slab")
