"""etcd killed under live clients: reads of what the node holds go on, writes fail with
Unavailable (never `internal`), a watch keeps waiting, and everything recovers by itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

import sdk
from tests.etcd_server import etcd_server


def test_etcd_killed_under_live_clients(start_daemon, tmp_path: Path) -> None:
    (tmp_path / "etcd").mkdir()
    with etcd_server(tmp_path / "etcd") as etcd:
        config = f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = 2\n[transport]\nprotocol = "off"\n'
        d = start_daemon("el", config=config)
        value = torch.arange(10_000, dtype=torch.float32)
        with d.client() as c:
            assert c.put("held", {"x": value}) == 1
            registry = c.status()["registry"]
            assert registry["kind"] == "etcd" and registry["lease"] == "held" and registry["lost_count"] == 0
            watch = c.watch("held", after=1, timeout=60)
            seen: list[int] = []
            watcher = threading.Thread(target=lambda: seen.append(next(watch)))
            watcher.start()

            stop = threading.Event()
            errors: list[BaseException] = []
            reads = [0]

            def reader() -> None:
                with d.client() as r:
                    while not stop.is_set():
                        try:
                            assert torch.equal(r.get("held", 1)["x"], value)
                            reads[0] += 1
                        except BaseException as exc:
                            errors.append(exc)
                            return

            t = threading.Thread(target=reader)
            t.start()
            etcd.stop(kill=True)
            try:
                failures = set()
                for _ in range(5):
                    try:
                        c.put("held", {"x": value})
                    except sdk.TensordError as exc:
                        failures.add(type(exc))
                assert failures == {sdk.Unavailable}
                deadline = time.monotonic() + 5  # the next keepalive fails, and the daemon says so
                while c.status()["registry"]["lease"] not in ("failing", "lost"):
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                with c.mount("held", 1) as m:
                    assert torch.equal(m.tensors["x"], value)
                before = reads[0]
                time.sleep(0.5)
                assert reads[0] > before  # local reads go on while etcd is gone
            finally:
                etcd.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    version = c.put("held", {"x": value + 1})
                    break
                except sdk.Unavailable:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert version == 2  # the failed commits used no version
            watcher.join(30)
            assert seen == [2]
            stop.set()
            t.join(30)
            assert not errors, errors
            assert torch.equal(c.get("held")["x"], value + 1)
            assert c.status()["reservations"] == 0 and c.status()["pins"] == 0
            while c.status()["registry"]["lease"] != "held":  # its next keepalive confirms it
                assert time.monotonic() < deadline
                time.sleep(0.1)
        log = d.log.read_text()
        assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def test_etcd_starts_on_other_ports_when_its_port_is_taken(monkeypatch) -> None:
    """A port found free may be taken before etcd binds it: the helper tries other ports."""
    import socket

    import tests.etcd_server as etcd_helper

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    real = etcd_helper.free_port
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(etcd_helper, "free_port", lambda: next(ports, None) or real())
    try:
        with etcd_server() as etcd:
            assert etcd.client_port != taken.getsockname()[1] and etcd.running
    finally:
        taken.close()
