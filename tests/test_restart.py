"""A daemon killed (SIGKILL) and restarted under live clients: clients reconnect by themselves,
what was pinned or reserved on the old daemon fails clearly, versions never go back."""

from __future__ import annotations

import json
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


def _state(tmp_path: Path) -> str:
    return f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'


def _restart(d) -> None:
    d.kill()
    d.start()


def test_a_client_reconnects_after_the_daemon_restarts(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("phoenix", config=_state(tmp_path))
    c = d.client()
    assert c.put("w", {"x": torch.ones(4)}) == 1
    _restart(d)
    # a new connection; the killed daemon's slabs are gone, and v1 came from a put (no file,
    # no peer): it stays listed, without a replica, and reads of it say it was lost
    assert [(s["name"], s["versions"], s["device"]) for s in c.ls()] == [("w", [1], None)]
    with pytest.raises(sdk.NotFound, match="w v1 was lost when node phoenix restarted"):
        c.get("w")
    assert c.put("w", {"x": torch.full((4,), 2.0)}) == 2  # versions go on from the state dir
    assert torch.equal(c.get("w")["x"], torch.full((4,), 2.0))
    c.close()


def test_a_call_that_loses_the_daemon_fails_once_then_the_client_reconnects(start_daemon) -> None:
    d = start_daemon("lost")
    with d.client() as c:
        c.put("a", {"x": torch.ones(2)})
        d.proc.send_signal(signal.SIGSTOP)
        t = threading.Thread(target=lambda: (time.sleep(0.5), d.kill()))
        t.start()
        with pytest.raises(sdk.Unavailable):
            c.ls()  # in flight when the daemon dies
        t.join()
        d.start()
        assert c.ls() == []


def test_the_default_client_reconnects_and_versions_never_go_back(start_daemon, monkeypatch) -> None:
    """Default config (no state dir, no etcd): the counters live in the default state
    directory, so a version after a restart is newer, and a follower waiting on it wakes."""
    d = start_daemon("default")
    monkeypatch.setenv("TENSORD_SOCKET", d.socket)
    monkeypatch.setattr(sdk, "_default", None)
    try:
        assert sdk.put("d", {"x": torch.arange(3)}) == 1
        woken: list[int] = []
        with d.client() as follower:
            watching = threading.Thread(target=lambda: woken.extend(follower.watch("d", after=1, timeout=60)))
            watching.start()
            time.sleep(1.0)  # the watch is waiting on the daemon
            _restart(d)
            assert sdk.put("d", {"x": torch.arange(4)}) == 2  # not 1 again: v1 named other bytes
            watching.join(90)
            assert woken[:1] == [2]
        assert torch.equal(sdk.get("d")["x"], torch.arange(4))
        assert list((Path(d.env["XDG_STATE_HOME"]) / "tensord").glob("*/versions/*.json"))
    finally:
        sdk.default_client().close()


def test_a_mount_from_before_the_restart_fails_clearly(start_daemon) -> None:
    d = start_daemon("mounted")
    c = d.client()
    c.put("m", {"x": torch.arange(1000)})
    m = c.mount("m")
    _restart(d)
    assert c.put("m", {"x": torch.zeros(1000)}) == 2  # the client works again
    with c.mount("m") as fresh:  # pin ids start again: the old mount's id may be this one's
        with pytest.raises(sdk.Unavailable, match="m v1: the connection that pinned it was lost"):
            m.close()
        assert c.info("m")["pins"] == 1  # the new pin was not released by the old mount
        assert torch.equal(fresh.tensors["x"], torch.zeros(1000))
    assert torch.equal(m.tensors["x"], torch.arange(1000))  # host views stay readable
    m.close()  # once is enough
    assert c.info("m")["pins"] == 0
    c.close()


def test_sigkill_mid_put_the_reservation_fails_clearly(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("midput", config=_state(tmp_path))
    c = d.client()
    assert c.put("p", {"a": torch.ones(4)}) == 1
    r = c.reserve("p", {"a": ("float32", (1 << 20,)), "b": ("float32", (1 << 20,))})
    r.write("a", torch.ones(1 << 20))
    _restart(d)
    r.write("b", torch.ones(1 << 20))  # into its own copy of the old slab: harmless
    with pytest.raises(sdk.Unavailable, match="reservation for p: the connection that made it was lost"):
        r.commit()
    info = c.info("p")  # v1 was committed: it stays, lost (a put); the reservation left nothing
    assert info["versions"] == [1] and info["replicas"] == []
    assert c.put("p", {"a": torch.ones(4)}) == 2
    assert c.status()["reservations"] == 0
    c.close()


def test_sigkill_mid_commit(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("midcommit", config=_state(tmp_path))
    c = d.client()
    r = c.reserve("c", {"a": ("float32", (16,))})
    r.write("a", torch.ones(16))
    d.proc.send_signal(signal.SIGSTOP)  # the commit is sent and never answered
    outcome: list[object] = []

    def commit() -> None:
        try:
            outcome.append(r.commit())
        except sdk.TensordError as exc:
            outcome.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    time.sleep(0.3)
    d.kill()
    t.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], sdk.Unavailable), outcome
    d.start()
    with pytest.raises(sdk.NotFound):
        c.info("c")
    assert c.put("c", {"a": torch.ones(16)}) >= 1
    c.close()


def test_sigkill_mid_get_never_gives_wrong_bytes(start_daemon) -> None:
    d = start_daemon("midget")
    big = {f"t{i}": torch.randn(8 << 20) for i in range(4)}  # 128 MiB
    with d.client() as c:
        c.put("g", big)
        outcomes: list[object] = []

        def read() -> None:
            while len(outcomes) < 50:
                try:
                    got = c.get("g")
                    outcomes.append(all(torch.equal(got[k], v) for k, v in big.items()))
                except sdk.TensordError as exc:
                    outcomes.append(exc)
                    return

        t = threading.Thread(target=read)
        t.start()
        time.sleep(0.5)
        d.kill()
        t.join(60)
        assert outcomes and all(o is True or isinstance(o, sdk.Unavailable) for o in outcomes), outcomes[-3:]
        d.start()
        assert c.ls() == []
        assert c.put("g", {"x": torch.ones(1)}) == 2  # versions never go back, even without a state dir


def test_a_watch_follows_across_a_restart(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("watched", config=_state(tmp_path))
    with d.client() as c:
        assert c.put("w", {"x": torch.ones(1)}) == 1
        seen: list[int] = []
        watch = c.watch("w", after=1, timeout=30)
        t = threading.Thread(target=lambda: seen.extend(next(watch) for _ in range(2)))
        t.start()
        assert c.put("w", {"x": torch.ones(1)}) == 2
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:  # delivered by the first daemon
            time.sleep(0.02)
        assert seen == [2]
        _restart(d)
        assert c.put("w", {"x": torch.ones(1)}) == 3
        t.join(30)
        assert seen == [2, 3]


# -- versions never go back ---------------------------------------------------------------------


def test_versions_never_go_back_across_restarts(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("counted", config=_state(tmp_path))
    with d.client() as c:
        assert [c.put("n", {"x": torch.ones(1)}) for _ in range(3)] == [1, 2, 3]
        assert c.put("other/name", {"x": torch.ones(1)}) == 1
        assert c.delete("n") == 3
    _restart(d)  # SIGKILL
    with d.client() as c:
        assert c.put("n", {"x": torch.ones(1)}) == 4
        assert c.put("other/name", {"x": torch.ones(1)}) == 2
        assert c.put("fresh", {"x": torch.ones(1)}) == 1
    assert d.stop() == 0  # SIGTERM
    d.start()
    with d.client() as c:
        assert c.put("n", {"x": torch.ones(1)}) == 5
    files = list((tmp_path / "state" / "versions").glob("*.json"))
    counters = {k: v for f in files for k, v in json.loads(f.read_text())["versions"].items()}
    assert counters == {"n": 5, "other/name": 2, "fresh": 1}


def test_the_state_dir_from_the_environment_and_its_lock(start_daemon, tmp_path: Path) -> None:
    state = str(tmp_path / "env-state")
    a = start_daemon("a", env={"TENSORD_STATE_DIR": state})
    with a.client() as c:
        assert c.put("e", {"x": torch.ones(1)}) == 1
    with pytest.raises(RuntimeError, match="in use by another daemon"):
        start_daemon("b", env={"TENSORD_STATE_DIR": state})
    a.kill()  # the lock goes with the process
    b = start_daemon("b", env={"TENSORD_STATE_DIR": state})
    with b.client() as c:
        assert c.put("e", {"x": torch.ones(1)}) == 2


def test_a_damaged_state_file_stops_the_daemon(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("damaged", config=_state(tmp_path))
    with d.client() as c:
        c.put("x", {"x": torch.ones(1)})
    d.kill()
    (bucket,) = (tmp_path / "state" / "versions").glob("*.json")
    bucket.write_text('{"format": 1, "versions": {"x": "one"}')
    with pytest.raises(RuntimeError, match="is not valid JSON: repair or remove it"):
        d.start()


def test_a_state_dir_that_cannot_be_written_fails_the_commit_cleanly(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("readonly", config=_state(tmp_path))
    with d.client() as c:
        assert c.put("r", {"x": torch.ones(1)}) == 1
        versions = tmp_path / "state" / "versions"
        (bucket,) = versions.glob("*.json")
        bucket.unlink()
        bucket.mkdir()  # the rename onto it fails
        with pytest.raises(sdk.Unavailable, match="cannot record version 2 of r"):
            c.put("r", {"x": torch.ones(1)})
        assert c.status()["reservations"] == 0 and c.info("r")["versions"] == [1]
        bucket.rmdir()
        assert c.put("r", {"x": torch.ones(1)}) == 2


# -- many client processes through restarts ----------------------------------------------------

WORKER = """
import os, sys, time, torch, sdk
me, stop = sys.argv[1], sys.argv[2]
ok = failed = 0
last_ok = 0.0
errors = set()
value = torch.arange(50_000, dtype=torch.float32) + int(me)
print("ready", flush=True)
while not os.path.exists(stop):
    try:
        sdk.put(f"live/{me}", {"x": value})
        got = sdk.get(f"live/{me}")["x"]
        assert torch.equal(got, value), "wrong bytes"
        with sdk.mount(f"live/{me}") as m:
            assert torch.equal(m.tensors["x"], value), "wrong bytes in a mount"
        ok += 1
        last_ok = time.time()
    except sdk.TensordError as exc:
        failed += 1
        errors.add(type(exc).__name__)
        time.sleep(0.05)
print(ok, failed, last_ok, ",".join(sorted(errors)) or "-", flush=True)
"""


def test_client_processes_live_through_restarts(start_daemon, tmp_path: Path) -> None:
    d = start_daemon("live", config=_state(tmp_path))
    stop = tmp_path / "stop"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(stop)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(TENSORD_SOCKET=d.socket),
        )
        for i in range(3)
    ]
    for w in workers:
        assert w.stdout is not None and w.stdout.readline() == "ready\n"
    time.sleep(1.0)
    for _ in range(2):
        _restart(d)
        time.sleep(0.5)
    back = time.time()  # every worker must succeed after the last restart
    deadline = time.monotonic() + 30
    with d.client() as c:
        while len([s for s in c.ls("live/") if s["latest"] >= 2]) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    time.sleep(0.5)
    stop.touch()
    results = []
    for w in workers:
        out, err = w.communicate(timeout=60)
        assert w.returncode == 0, err[-2000:]
        ok, failed, last_ok, errors = out.split()
        results.append((int(ok), int(failed), float(last_ok), errors))
    for _, _, last_ok, errors in results:
        assert last_ok > back, results  # working again after the restarts
        assert set(errors.split(",")) <= {"Unavailable", "NotFound", "-"}, results
    with d.client() as c:
        assert c.status()["pins"] == 0 and c.status()["reservations"] == 0
