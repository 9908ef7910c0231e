"""Publishing without a copy, the control plane: what the daemon accepts, how long a published
version lives, and how unpublish waits for readers. Real daemon processes; the publisher
speaks raw frames, because the daemon never touches the published bytes (readers map them
from the IPC handles): reading them needs a GPU (tests/test_publish_gpu.py)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch

import sdk
from tensord_contract.manifest import Table
from tests.daemons import DaemonProcess, tensord, wait_gone
from tests.etcd_server import free_port
from tests.frames import Raw, code

HANDLE = bytes(range(64))  # well-formed; the daemon only passes handles on to readers


def _table(**shapes: list[int]) -> dict[str, Any]:
    return Table.build(list(shapes), ["float32"] * len(shapes), list(shapes.values())).to_wire()


def _args(name: str = "pub/bad", **over: Any) -> dict[str, Any]:
    """A valid publish of two float32 tensors (16 and 8 bytes) in one 4096-byte allocation."""
    args: dict[str, Any] = {
        "name": name,
        "tensors": _table(a=[4], b=[2]),
        "replica": {
            "device": 0,
            "handles": [HANDLE],
            "sizes": [4096],
            "block": np.array([0, 0], "<u4").tobytes(),
            "offset": np.array([0, 512], "<u8").tobytes(),
        },
        "fingerprints": np.array([1, 2], "<u8").tobytes(),
    }
    for key, value in over.items():
        if isinstance(args["replica"], dict) and key in args["replica"]:
            args["replica"][key] = value
        else:
            args[key] = value
    return args


_EXPOSED = {  # the same two tensors registered with a publisher's Transfer Engine, host memory
    "session": "127.0.0.1:1",
    "device": "cpu",
    "addresses": [1 << 20],
    "sizes": [4096],
    "block": np.array([0, 0], "<u4").tobytes(),
    "offset": np.array([0, 512], "<u8").tobytes(),
}


def _ok(reply: dict[str, Any]) -> Any:
    assert reply.get("ok"), reply
    return reply["result"]


BAD = [
    {"handles": [HANDLE[:63]]},
    {"handles": [HANDLE, HANDLE]},  # two handles, one size
    {"sizes": [0]},
    {"sizes": [2**48]},
    {"device": -1},
    {"device": "0"},
    {"block": np.array([0, 1], "<u4").tobytes()},  # no allocation 1
    {"block": np.array([0], "<u4").tobytes()},  # one row short
    {"offset": np.array([0, 4090], "<u8").tobytes()},  # b runs past the allocation's end
    {"offset": np.array([0, 2**63], "<u8").tobytes()},
    {"offset": "0"},
    {"fingerprints": np.array([1], "<u8").tobytes()},
    {"replica": [1, 2]},
    {"tensors": {"count": 1}},
    {"origin": 7},
    {"name": "Bad Name"},
    {"replica": None},  # neither an IPC export nor a Transfer Engine registration
    {"replica": None, "exposed": [1]},
    {"replica": None, "exposed": {**_EXPOSED, "session": "no-port"}},
    {"replica": None, "exposed": {**_EXPOSED, "device": "gpu"}},
    {"replica": None, "exposed": {**_EXPOSED, "addresses": [0]}},
    {"replica": None, "exposed": {**_EXPOSED, "addresses": [4096, 8192]}},  # two addresses, one size
    {"replica": None, "exposed": {**_EXPOSED, "offset": np.array([0, 4090], "<u8").tobytes()}},
    {"exposed": _EXPOSED},  # says host memory where the IPC export says cuda:0
]


@pytest.mark.parametrize("bad", BAD, ids=range(len(BAD)))
def test_bad_publishes_are_refused_and_change_nothing(daemon, bad: dict[str, Any]) -> None:
    raw = Raw(daemon.socket)
    try:
        before = _ok(raw.call("ls"))
        assert code(raw.call("publish", **{**_args("pub/bad"), **_args(**bad)})) == "invalid_argument"
        assert _ok(raw.call("ls")) == before
        assert _ok(raw.call("status"))["published"] == []
    finally:
        raw.close()


def test_a_host_publication_is_handed_to_readers_as_the_publishers_engine(daemon) -> None:
    raw, reader = Raw(daemon.socket), Raw(daemon.socket)
    try:
        v = _ok(raw.call("publish", **_args("pub/exposed", replica=None, exposed=_EXPOSED)))["version"]
        opened = _ok(reader.call("open", name="pub/exposed"))
        replica = opened["replica"]
        assert opened["version"] == v and replica["kind"] == "published" and replica["node"] == daemon.node
        assert (replica["session"], replica["addresses"], replica["device"]) == ("127.0.0.1:1", [1 << 20], "cpu")
        assert _ok(reader.call("status"))["devices"]["cpu"]["published"] == 24
    finally:
        raw.close()
        reader.close()


def test_a_published_version_lives_with_its_publisher(daemon) -> None:
    with daemon.client() as c:
        base = c.put("pub/life", {"a": torch.ones(4), "b": torch.ones(2)})
        raw = Raw(daemon.socket)
        v = _ok(raw.call("publish", **_args("pub/life")))["version"]
        assert v == base + 1
        info = c.info("pub/life")
        assert info["version"] == v and info["count"] == 2 and info["device"] == "cuda:0"
        [entry] = c.status()["published"]
        assert (entry["name"], entry["version"], entry["device"], entry["pins"]) == ("pub/life", v, "cuda:0", 0)
        assert c.status()["devices"]["cpu"]["used"] > 0  # the put's slab; the publication counts none
        shown = tensord("status", socket=daemon.socket)
        assert shown.returncode == 0 and f"published pub/life v{v} on cuda:0" in shown.stdout, shown
        # a reader on this node gets the publisher's handles and each tensor's place
        reader = Raw(daemon.socket)
        opened = _ok(reader.call("open", name="pub/life"))
        assert opened["version"] == v and opened["replica"]["kind"] == "owned"
        assert opened["replica"]["handles"] == [HANDLE]
        # the publisher leaves (its connection closes): the version goes at once, "latest" falls back
        raw.close()
        deadline = time.monotonic() + 5
        while c.status()["published"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.status()["published"] == []
        assert c.info("pub/life")["version"] == base
        with pytest.raises(sdk.NotFound):
            c.info("pub/life", v)
        # the reader that still pinned it learns that its bytes may have changed
        assert _ok(reader.call("release", pin=opened["pin"])) == {"released": True, "intact": False}
        reader.close()
        c.delete("pub/life")


def test_unpublish_waits_for_readers_then_withdraws(daemon) -> None:
    raw, reader = Raw(daemon.socket), Raw(daemon.socket)
    try:
        v = _ok(raw.call("publish", **_args("pub/drain")))["version"]
        pin = _ok(reader.call("open", name="pub/drain"))["pin"]
        t0 = time.monotonic()
        result = _ok(raw.call("unpublish", name="pub/drain", version=v, timeout=0.3))
        assert result == {"drained": False, "pins": 1}
        assert time.monotonic() - t0 >= 0.3
        assert code(reader.call("open", name="pub/drain")) == "not_found"  # withdrawn for new readers
        assert _ok(reader.call("release", pin=pin))["intact"] is False  # revoked: the publisher may write now
        # with no reader, unpublish answers at once; twice is NotFound
        v2 = _ok(raw.call("publish", **_args("pub/drain")))["version"]
        pin2 = _ok(reader.call("open", name="pub/drain", version=v2))["pin"]
        assert _ok(reader.call("release", pin=pin2))["intact"] is True
        assert _ok(raw.call("unpublish", name="pub/drain", version=v2)) == {"drained": True, "pins": 0}
        assert code(raw.call("unpublish", name="pub/drain", version=v2)) == "not_found"
        assert _ok(raw.call("status"))["published"] == []
    finally:
        raw.close()
        reader.close()


def test_a_reader_released_during_unpublish_lets_it_return(daemon) -> None:
    raw, reader = Raw(daemon.socket), Raw(daemon.socket)
    try:
        v = _ok(raw.call("publish", **_args("pub/wait")))["version"]
        pin = _ok(reader.call("open", name="pub/wait"))["pin"]
        raw.send({"id": 99, "op": "unpublish", "args": {"name": "pub/wait", "version": v, "timeout": 30}})
        time.sleep(0.2)
        assert _ok(reader.call("release", pin=pin))["intact"] is True  # released before the deadline
        reply = raw.recv()
        assert reply is not None and reply["result"] == {"drained": True, "pins": 0}
    finally:
        raw.close()
        reader.close()


def test_only_the_publishing_connection_unpublishes(daemon) -> None:
    raw, other = Raw(daemon.socket), Raw(daemon.socket)
    try:
        v = _ok(raw.call("publish", **_args("pub/owner")))["version"]
        assert code(other.call("unpublish", name="pub/owner", version=v)) == "not_found"
        assert code(raw.call("unpublish", name="pub/owner", version=v, timeout=-1)) == "invalid_argument"
        assert code(raw.call("unpublish", name="pub/owner", version="latest")) == "invalid_argument"
        assert _ok(raw.call("info", name="pub/owner"))["version"] == v  # still there
    finally:
        raw.close()
        other.close()


def test_a_sigkilled_publisher_withdraws_its_version(daemon) -> None:
    script = (
        "import sys, numpy as np\n"
        "from tests.frames import Raw\n"
        "from tests.test_publish import _args\n"
        "r = Raw(sys.argv[1])\n"
        "print(r.call('publish', **_args('pub/killed'))['result']['version'], flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, daemon.socket], stdout=subprocess.PIPE, text=True)
    try:
        version = int(proc.stdout.readline())  # type: ignore[union-attr]
        with daemon.client() as c:
            assert c.info("pub/killed")["version"] == version
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            wait_gone(c, "pub/killed")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_sdk_refuses_what_cannot_be_published_without_a_copy(client: sdk.Client) -> None:
    with pytest.raises(sdk.InvalidArgument, match="not contiguous"):
        client.publish("pub/cpu", {"a": torch.ones(3, 4).t()})
    with pytest.raises(sdk.InvalidArgument):
        client.publish("Bad Name", {"a": torch.ones(3)})
    with pytest.raises(sdk.InvalidArgument, match="nothing to publish"):
        client.publish("pub/cpu", {})
    with pytest.raises(sdk.InvalidArgument, match="mapping"):
        client.publish("pub/cpu", [torch.ones(3)])  # type: ignore[arg-type]
    assert "pub/cpu" not in [s["name"] for s in client.ls()]


def test_a_tcp_connection_cannot_publish(start_daemon) -> None:
    port = free_port()
    start_daemon("tcp-pub", config=f'[daemon]\nlisten = "127.0.0.1:{port}"\n')
    raw = Raw(tcp=("127.0.0.1", port))
    try:
        reply = raw.call("publish", **_args("pub/tcp"))
        assert code(reply) == "invalid_argument" and "Unix socket" in reply["error"]["message"]
    finally:
        raw.close()


def test_other_nodes_are_told_a_published_version_is_read_on_its_node(etcd, tmp_path) -> None:
    """In a cluster the version is in etcd, but its bytes are in the publisher's memory: a read
    or a replicate from another node fails with a clear message, and the publisher's node
    withdraws it from etcd when the publisher leaves."""
    from tests.test_cluster import Cluster

    cluster = Cluster(tmp_path, etcd)
    try:
        a, b = cluster.start("pub-a"), cluster.start("pub-b")
        raw = Raw(a.socket)
        v = _ok(raw.call("publish", **_args("pub/cluster")))["version"]
        with b.client() as cb:
            assert cb.info("pub/cluster")["version"] == v  # the registry knows it
            with pytest.raises(sdk.TensordError, match="publish"):
                cb.get("pub/cluster")
            with pytest.raises(sdk.TensordError, match="publish"):
                cb.replicate("pub/cluster", to=["pub-b"])
            raw.close()
            wait_gone(cb, "pub/cluster")
    finally:
        cluster.stop()


def test_a_daemon_restarted_after_a_crash_forgets_its_publications(start_daemon, tmp_path) -> None:
    d = start_daemon("pub-crash", config=f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    with d.client() as c:
        assert c.put("pub/crash", {"a": torch.ones(4), "b": torch.ones(2)}) == 1
        raw = Raw(d.socket)
        assert _ok(raw.call("publish", **_args("pub/crash")))["version"] == 2
        d.kill()  # SIGKILL: the publication's record is all that is left of it
        raw.close()
        d.start()
        info = c.info("pub/crash")
        assert info["versions"] == [1] and info["latest"] == 1  # v1 is lost (a put); v2 is gone
        assert c.status()["published"] == []
        assert c.put("pub/crash", {"a": torch.ones(4), "b": torch.ones(2)}) == 3  # never reused


def test_a_node_restarted_after_a_crash_withdraws_its_publications_from_etcd(etcd, tmp_path) -> None:
    """etcd keeps the manifest and "latest" of a version whose only replica died with its node;
    the node's next start withdraws it, so "latest" falls back to the version another node holds."""
    from tests.test_cluster import Cluster, _config

    cluster = Cluster(tmp_path, etcd)
    try:
        state = f'[daemon]\nstate_dir = "{tmp_path / "state-a"}"\n'
        config = _config(etcd, free_port()).replace("[daemon]\n", state)
        a = cluster.nodes["crash-a"] = DaemonProcess(tmp_path, "crash-a", config).start()
        b = cluster.start("crash-b")
        with b.client() as cb:
            assert cb.put("pub/etcd-crash", {"a": torch.ones(4), "b": torch.ones(2)}) == 1
            raw = Raw(a.socket)
            assert _ok(raw.call("publish", **_args("pub/etcd-crash")))["version"] == 2
            a.kill()
            raw.close()
            assert cb.info("pub/etcd-crash")["latest"] == 2  # stuck while node a is down
            a.start()
            deadline = time.monotonic() + 15
            while cb.info("pub/etcd-crash")["latest"] != 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            info = cb.info("pub/etcd-crash")
            assert info["latest"] == 1 and info["versions"] == [1]
            assert torch.equal(cb.get("pub/etcd-crash")["a"], torch.ones(4))
    finally:
        cluster.stop()


def test_a_withdrawal_waits_out_an_etcd_outage(start_daemon, own_etcd) -> None:
    config = f'[registry]\netcd_endpoints = ["{own_etcd.endpoint}"]\nlease_ttl = 2\n[transport]\nprotocol = "off"\n'
    d = start_daemon("pub-outage", config=config)
    with d.client() as c:
        assert c.put("pub/outage", {"a": torch.ones(4), "b": torch.ones(2)}) == 1
        raw = Raw(d.socket)
        assert _ok(raw.call("publish", **_args("pub/outage")))["version"] == 2
        own_etcd.stop(kill=True)
        raw.close()  # the publisher leaves while the registry is unreachable
        deadline = time.monotonic() + 10
        while c.status()["published"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.status()["published"] == []  # withdrawn here at once
        own_etcd.restart()
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            with contextlib.suppress(sdk.Unavailable):
                if c.info("pub/outage")["latest"] == 1:
                    break
            time.sleep(0.2)
        assert c.info("pub/outage")["versions"] == [1]  # and from the registry once it is back
    log = d.log.read_text()
    assert "withdrawing pub/outage v2 waits for the registry" in log and "withdrew pub/outage v2" in log


def test_a_publish_of_the_known_table_names_it_by_its_digest(daemon) -> None:
    """Publishing the same layout again (an RL engine after each update) names the table by its
    digest; a digest the daemon does not know (another table published or put since) is
    answered with a request for the table, and publishes nothing."""
    raw = Raw(daemon.socket)
    try:
        v1 = _ok(raw.call("publish", **_args("pub/digest")))["version"]
        digest = Table.from_wire(_table(a=[4], b=[2]), ValueError).digest
        again = {k: v for k, v in _args("pub/digest").items() if k != "tensors"}
        v2 = _ok(raw.call("publish", **again, table_digest=digest))["version"]
        assert v2 == v1 + 1
        other = Table.from_wire(_table(a=[2], b=[4]), ValueError).digest
        assert _ok(raw.call("publish", **again, table_digest=other)) == {"table_wanted": True}
        listed = [(e["name"], e["version"]) for e in _ok(raw.call("status"))["published"]]
        assert listed == [("pub/digest", v1), ("pub/digest", v2)]
        bad = raw.call("publish", **again, table_digest=b"x" * 5)
        assert not bad.get("ok") and "table_digest" in str(bad)
    finally:
        raw.close()
