"""Running out of descriptors, and a full listen backlog: the daemon and the SDK wait it out."""

from __future__ import annotations

import errno
import resource
import shutil
import signal
import socket
import threading
import time

import pytest
import torch

import sdk

needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")


def _limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


@needs_prlimit
def test_serve_raises_its_soft_fd_limit_to_the_hard_limit(start_daemon) -> None:
    d = start_daemon("nofile", nofile=(256, 4096))
    assert _limits(d.pid) == (4096, 4096)


@needs_prlimit
def test_running_out_of_descriptors_is_out_of_capacity_and_accepting_survives(start_daemon) -> None:
    """A daemon held to 160 descriptors: each held version keeps one (its memfd). Versions
    beyond the limit fail with OutOfCapacity; connections beyond it wait in the backlog and are
    served once descriptors are free again (the accept loop survives EMFILE)."""
    d = start_daemon("fdcap", nofile=(160, 160))
    with d.client(timeout=30) as c:
        held: list[int] = []

        def put_until_refused() -> None:
            for i in range(200):
                held.append(c.put(f"v/{i}", {"x": torch.full((4,), float(i))}))

        with pytest.raises(sdk.OutOfCapacity, match=r"file descriptors|Too many open files"):
            put_until_refused()
        assert len(held) > 50
        assert c.status()["reservations"] == 0
        last = len(held) - 1
        assert torch.equal(c.get(f"v/{last}")["x"], torch.full((4,), float(last)))
        # Fill the rest with connections: the daemon's accept() fails with EMFILE meanwhile.
        extra = []
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            extra.append(s)
        deadline = time.monotonic() + 10
        while "accept failed" not in d.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "accept failed" in d.log.read_text()
        for s in extra:
            s.close()
        for i in range(len(held) // 2):
            c.delete(f"v/{i}")
    t0 = time.monotonic()
    with d.client(timeout=20) as fresh:  # a new connection is accepted again
        assert fresh.status()["versions"] == len(held) - len(held) // 2
        assert fresh.put("after", {"x": torch.ones(3)}) == 1
    assert time.monotonic() - t0 < 10
    assert d.proc is not None and d.proc.poll() is None


def _fill_backlog(path: str, limit: int) -> list[socket.socket]:
    """Connect without being accepted until the listener's backlog refuses (EAGAIN)."""
    sockets = []
    for _ in range(limit):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return sockets
        except OSError as exc:
            s.close()
            if exc.errno == errno.EAGAIN:
                return sockets
            raise
        sockets.append(s)
    raise AssertionError(f"backlog took more than {limit} connections")


def _room_for(n: int) -> None:
    """Let this process open `n` more descriptors, or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 1000
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} descriptors in the test process (hard limit {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def test_connect_waits_while_the_backlog_is_full(start_daemon) -> None:
    _room_for(9000)
    d = start_daemon("backlog")
    with d.client() as c:
        c.put("b", {"x": torch.arange(5)})
    d.proc.send_signal(signal.SIGSTOP)  # accepts nothing while stopped
    filler: list[socket.socket] = []
    try:
        filler = _fill_backlog(d.socket, 9000)
        with open("/proc/sys/net/core/somaxconn") as f:
            assert len(filler) >= min(int(f.read()), 4096)  # the daemon asks for 4096
        outcome: list[object] = []

        def read() -> None:
            try:
                with d.client(timeout=30) as late:
                    outcome.append(late.get("b")["x"])
            except sdk.TensordError as exc:
                outcome.append(exc)

        t = threading.Thread(target=read)
        t.start()
        time.sleep(1.0)
        assert not outcome  # still waiting for room in the backlog, not failed
    finally:
        d.proc.send_signal(signal.SIGCONT)
        for s in filler:
            s.close()
    t.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], torch.Tensor), outcome
    assert torch.equal(outcome[0], torch.arange(5))


def test_connect_gives_up_at_its_timeout(start_daemon) -> None:
    _room_for(9000)
    d = start_daemon("backlog2")
    d.proc.send_signal(signal.SIGSTOP)
    filler: list[socket.socket] = []
    try:
        filler = _fill_backlog(d.socket, 9000)
        t0 = time.monotonic()
        with pytest.raises(sdk.Unavailable, match="backlog"):
            sdk.Client(d.socket, timeout=1.0).ls()
        assert 0.9 < time.monotonic() - t0 < 5
    finally:
        d.proc.send_signal(signal.SIGCONT)
        for s in filler:
            s.close()
