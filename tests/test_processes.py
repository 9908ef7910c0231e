"""Real processes: clients killed with SIGKILL, concurrent readers and writers, daemon lifecycle."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import sdk
from tests.daemons import child_env


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


MOUNTER = """
import sys, time, sdk
m = sdk.Client(sys.argv[1]).mount(sys.argv[2])
print("mounted", m.version, float(m.tensors["x"].sum()), flush=True)
time.sleep(600)
"""


def test_mount_is_released_when_its_process_is_killed(daemon, client: sdk.Client) -> None:
    client.put("held-by-child", {"x": torch.ones(1000)})
    with subprocess.Popen(
        [sys.executable, "-c", MOUNTER, daemon.socket, "held-by-child"],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["mounted", "1", "1000.0"]
        assert client.info("held-by-child")["pins"] == 1
        client.delete("held-by-child")  # pinned: kept until the child lets go
        assert client.status()["pins"] == 1
        child.send_signal(signal.SIGKILL)
        child.wait()
        _wait_for(lambda: client.status()["pins"] == 0)


def test_concurrent_writers_and_readers_never_see_a_mixed_version(daemon) -> None:
    """Each version is filled with its own number; a reader must never see two numbers mixed."""
    errors: list[BaseException] = []
    versions: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        with daemon.client() as c:
            for _ in range(15):
                v_tensors = {f"t{i}": torch.empty(20_000) for i in range(4)}
                # The value is unknown until commit, so tag by writer-chosen content, then check.
                tag = float(threading.get_ident() % 1000 + len(versions))
                for t in v_tensors.values():
                    t.fill_(tag)
                versions.append(c.put("contended", v_tensors))

    def reader() -> None:
        with daemon.client() as c:
            while not stop.is_set():
                try:
                    got = c.get("contended", verify=True)
                except sdk.NotFound:
                    continue
                values = {float(t[0]) for t in got.values()} | {float(t[-1]) for t in got.values()}
                if len(values) != 1 or any(not torch.all(t == t[0]) for t in got.values()):
                    errors.append(AssertionError(f"mixed version: {values}"))

    try:
        writers = [threading.Thread(target=writer) for _ in range(3)]
        readers = [threading.Thread(target=reader) for _ in range(3)]
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join()
    except BaseException as exc:
        errors.append(exc)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:3]
    assert sorted(versions) == list(range(1, 46))
    with daemon.client() as c:
        assert c.info("contended")["versions"] == list(range(1, 46))
        assert c.status()["pins"] == 0 and c.status()["reservations"] == 0


def test_sigterm_shuts_down_cleanly(start_daemon) -> None:
    d = start_daemon("term")
    with d.client() as c:
        c.put("x", {"x": torch.ones(10)})
    assert d.stop() == 0
    assert not Path(d.socket).exists()
    assert "stopped" in d.log.read_text()


def test_restart_after_sigkill_reuses_the_stale_socket(start_daemon) -> None:
    d = start_daemon("phoenix")
    d.kill()
    assert Path(d.socket).exists()  # left behind by the dead daemon
    d.start()
    with d.client() as c:
        assert c.ls() == []  # a killed daemon loses its slabs
        assert c.put("again", {"x": torch.ones(1)}) == 1


def test_second_daemon_on_a_live_socket_is_refused(start_daemon, daemon) -> None:
    with pytest.raises(RuntimeError, match="another daemon is listening"):
        start_daemon("intruder", env={"TENSORD_SOCKET": daemon.socket})
    with daemon.client() as c:
        c.ls()  # the first one is unharmed
