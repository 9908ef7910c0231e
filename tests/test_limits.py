"""Running out of descriptors: the daemon reports it and waits it out."""

from __future__ import annotations

import socket
import time

import pytest
import torch

import sdk


def _limits(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def test_serve_raises_its_soft_fd_limit_to_the_hard_limit(start_daemon) -> None:
    d = start_daemon("nofile", nofile=(256, 4096))
    assert _limits(d.pid) == (4096, 4096)


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

        with pytest.raises(sdk.OutOfCapacity, match="file descriptors"):
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
