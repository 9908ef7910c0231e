"""systemd's notify protocol against a datagram socket standing in for systemd's: READY once the
control socket accepts, watchdog pings from the event loop (none while it is stopped), STOPPING
on SIGTERM; paths and the abstract namespace."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

import pytest

from tensord.notify import Notifier


def _listener(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


def _messages(sock: socket.socket, seconds: float) -> list[dict[str, str]]:
    """Every message that arrives within `seconds`."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
    return out


@pytest.mark.parametrize("abstract", [False, True])
def test_messages_reach_the_socket(tmp_path: Path, abstract: bool) -> None:
    name = f"tensord-test-{uuid.uuid4().hex}"
    address: str | bytes = b"\0" + name.encode() if abstract else str(tmp_path / "notify")
    env_value = f"@{name}" if abstract else str(address)
    with _listener(address) as sock:
        n = Notifier({"NOTIFY_SOCKET": env_value})
        assert n.enabled and n.ready("serving")
        assert _messages(sock, 1)[0] == {"READY": "1", "STATUS": "serving", "MAINPID": str(os.getpid())}
        assert n.stopping()
        assert _messages(sock, 1) == [{"STOPPING": "1", "STATUS": "stopping"}]
        n.close()


def test_no_socket_no_messages_and_a_gone_socket_is_not_an_error(tmp_path: Path) -> None:
    assert not Notifier({}).ready("serving")
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert gone.enabled and not gone.ready("serving")  # logged once, never raised
    gone.close()
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None  # not ours
    assert Notifier({"WATCHDOG_USEC": "1000000"}).watchdog_seconds == 1.0


def test_the_daemon_speaks_the_protocol(start_daemon, tmp_path: Path) -> None:
    name = f"tensord-test-{uuid.uuid4().hex}"
    with _listener(b"\0" + name.encode()) as sock:
        env = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "400000"}
        d = start_daemon("notified", env=env)
        first = _messages(sock, 3)
        assert first[0]["READY"] == "1" and first[0]["MAINPID"] == str(d.pid), first
        assert first[0]["STATUS"] == "serving"
        pings = sum(m.get("WATCHDOG") == "1" for m in first)
        assert pings >= 8, first  # every 0.2 s for 3 s
        d.proc.send_signal(signal.SIGSTOP)  # a stalled daemon: no more pings
        try:
            _messages(sock, 0.3)  # what was already on its way
            assert _messages(sock, 1.0) == []
        finally:
            d.proc.send_signal(signal.SIGCONT)
        assert any(m.get("WATCHDOG") == "1" for m in _messages(sock, 1.0))
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0
        last = [m for m in _messages(sock, 0.5) if "WATCHDOG" not in m]
        assert last == [{"STOPPING": "1", "STATUS": "stopping"}]


def test_ready_comes_after_the_socket_accepts(tmp_path: Path) -> None:
    """READY means clients can connect: the socket accepts the moment READY arrives."""
    import subprocess
    import sys

    from tests.daemons import child_env

    notify = tmp_path / "notify"
    control = tmp_path / "d.sock"
    with _listener(str(notify)) as sock:
        env = child_env(NOTIFY_SOCKET=str(notify), TENSORD_SOCKET=str(control))
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensord", "serve", "--node", "early"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            sock.settimeout(30)
            message = sock.recv(4096).decode()
            assert "READY=1" in message
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(str(control))  # no retry: it must accept already
            probe.close()
        finally:
            proc.kill()
            proc.wait()


def test_requests_before_the_registry_is_up_wait_for_it(start_daemon, tmp_path: Path) -> None:
    """The socket accepts before the registry has started (the node record names the socket):
    a request arriving then waits for it, and READY follows it, never an internal error."""
    import threading

    import torch

    from tests.etcd_server import etcd_server

    (tmp_path / "etcd").mkdir()
    with etcd_server(tmp_path / "etcd") as etcd:
        assert etcd._proc is not None
        etcd._proc.send_signal(signal.SIGSTOP)  # the daemon's lease grant hangs
        try:
            config = f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\n[transport]\nprotocol = "off"\n'
            d = start_daemon("early-put", config=config)  # returns once the socket accepts
            outcome: list[object] = []

            def put() -> None:
                with d.client() as c:
                    try:
                        outcome.append(c.put("early", {"x": torch.ones(2)}))
                    except Exception as exc:
                        outcome.append(exc)

            t = threading.Thread(target=put)
            t.start()
            time.sleep(0.5)
            assert outcome == []  # waiting for the registry
        finally:
            etcd._proc.send_signal(signal.SIGCONT)
        t.join(30)
        assert outcome == [1]
        assert "internal error" not in d.log.read_text()


def _answers_status(d, times: int) -> None:
    """`status` answered `times` times in a row within a few seconds each (the loop runs); on
    a blocked loop the asking thread is left behind, to end when the daemon is killed."""
    import threading

    answered: list[int] = []

    def ask() -> None:
        with d.client() as c:
            for i in range(times):
                c.status()
                answered.append(i)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(10 + times)
    assert len(answered) == times, f"{len(answered)} of {times} status calls answered: the loop is blocked"


def test_a_receiver_that_never_reads_costs_messages_not_the_loop(start_daemon, tmp_path: Path) -> None:
    """A full notify queue drops pings (one warning); status is answered and SIGTERM honoured."""
    name = f"tensord-test-{uuid.uuid4().hex}"
    with _listener(b"\0" + name.encode()):  # bound, never read: its queue fills in a moment
        d = start_daemon("deaf", env={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "20000"})
        time.sleep(1.5)  # a ping every 10 ms: far more than the queue takes
        _answers_status(d, 15)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(20) == 0
        log = d.log.read_text()
        assert log.count("does not read: messages are dropped") == 1, log
        assert f"@{name}" in log


def test_an_abstract_socket_nobody_binds_gives_one_warning(start_daemon) -> None:
    name = f"tensord-test-{uuid.uuid4().hex}"
    d = start_daemon("unheard", env={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "100000"})
    time.sleep(1.0)  # ~20 pings, each refused
    _answers_status(d, 3)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
    log = d.log.read_text()
    assert log.count("cannot notify systemd") == 1, log
    assert f"cannot notify systemd at @{name}" in log
