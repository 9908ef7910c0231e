"""A relay that freezes (SIGSTOP) in the middle of a fan-out: its process answers nothing, yet
its connections and its Transfer Engine port stay open. The other target must finish from the
other holders, and `replicate(..., to=[...])` must return once the frozen node's lease expired,
with the targets that finished and an error naming the frozen one."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import sdk
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.test_fleet import CHUNK, _config, _same, _set, _wait

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")


@pytest.fixture
def frozen_safe(etcd, tmp_path: Path):
    """Start daemons; whatever the test stopped is continued, then everything killed."""
    started: list[DaemonProcess] = []

    def start(names: list[str]) -> dict[str, DaemonProcess]:
        # a read from a frozen peer ends when the engine gives up on it: 5 s here (default 30)
        env = {"MC_TRANSFER_TIMEOUT": "5", "MC_TCP_PROGRESS_TIMEOUT_SEC": "5", "MC_TCP_STATUS_TIMEOUT_SEC": "5"}
        daemons = {n: DaemonProcess(tmp_path, n, _config(etcd), env=env) for n in names}
        threads = [threading.Thread(target=d.start, args=(60,)) for d in daemons.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started.extend(daemons.values())
        return daemons

    yield start
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            os.kill(d.pid, signal.SIGCONT)
        d.kill()


def test_a_frozen_relay_neither_hangs_the_fan_out_nor_its_downstream(frozen_safe) -> None:
    nodes = frozen_safe(["zs", "zr", "zd"])
    src = _set(7, mib=8)
    with nodes["zs"].client() as c:
        c.put("fleet/frozen", src)
        nbytes = c.info("fleet/frozen")["slab_bytes"]
    outcome: dict[str, Any] = {}

    def fan_out() -> None:
        try:  # both pull slowly, so that the freeze lands mid-stream
            with nodes["zs"].client() as c:
                outcome["result"] = c.replicate("fleet/frozen", to=["zr", "zd"], rate=nbytes // 2)
        except sdk.TensordError as exc:
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    t = threading.Thread(target=fan_out)
    t.start()
    with nodes["zd"].client() as d:

        def relayed() -> bool:  # zd already reads chunks from zr, and zr is far from done
            pulls = d.status()["pulls"]
            return bool(pulls) and pulls[0]["sources"].get("zr", 0) >= 4 * CHUNK

        _wait(relayed, 30)
        os.kill(nodes["zr"].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        t.join(90)
        assert not t.is_alive(), "replicate did not return after the frozen node's lease expired"
        took = outcome["at"] - t0
        with d.mount("fleet/frozen") as m:
            assert _same(dict(m.tensors), src)  # complete and bit-exact
        assert "zd" in [r["node"] for r in d.info("fleet/frozen")["replicas"]]
    error = outcome.get("error")
    assert isinstance(error, sdk.TransferError), outcome
    assert error.details["failed"] == ["zr"] and error.details["done"] == ["zd"] and "zr" in error.message
    print(f"fan-out returned {took:.1f} s after the relay froze: {error.message}")
    assert took < 25  # lease (2 s), the engine's timeout (5 s), the drain: not 24 h, not 60 s
