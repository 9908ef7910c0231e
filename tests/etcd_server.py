"""A real etcd server for tests: free loopback ports, a temporary data dir, start/stop/restart.

    with etcd_server() as etcd:          # started and healthy
        EtcdRegistry([etcd.endpoint])
        etcd.stop(kill=True)             # SIGKILL: etcd is gone mid-run
        etcd.start()                     # same ports, same data dir: state survives

`start_etcd()` is the plain-function form; the caller then owns `stop()` and `cleanup()`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ETCD_BIN = os.environ.get("TENSORD_TEST_ETCD", shutil.which("etcd") or "/usr/bin/etcd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One single-member etcd cluster on 127.0.0.1, owned by the test that started it."""

    def __init__(self, workdir: Path | None = None) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="tensord-etcd-")) if workdir is None else workdir
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """`host:port` of the client listener, what EtcdRegistry takes."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        """Start etcd (again: same ports, same data dir) and wait until it reports healthy."""
        if self.running:
            return
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            ETCD_BIN,
            "--name=default",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--initial-cluster-state=new",
            # a fast single-member election; the minimum lease TTL stays below one second
            "--heartbeat-interval=25",
            "--election-timeout=250",
            "--logger=zap",
            "--log-level=warn",
        ]
        log = self.log_path.open("ab")
        try:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self._proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self._proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"etcd not healthy after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop etcd: SIGTERM and wait, or SIGKILL (a crash). The data dir is kept."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def cleanup(self) -> None:
        """Stop etcd and remove its data (when the workdir was ours)."""
        self.stop(kill=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, nbytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-nbytes:].decode(errors="replace")
        except OSError:
            return ""

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as resp:
                return resp.status == 200 and b'"true"' in resp.read()
        except (OSError, urllib.error.URLError):
            return False


def start_etcd(workdir: Path | None = None, timeout: float = 15.0, attempts: int = 3) -> EtcdServer:
    """Start a fresh etcd on free loopback ports; the caller must call `cleanup()`. A port
    found free can be taken before etcd binds it (another process's outgoing connection picks
    the same ephemeral port): then again on other ports, `attempts` times in all."""
    for attempt in range(attempts):
        server = EtcdServer(workdir)
        try:
            server.start(timeout)
            return server
        except BaseException as exc:
            server.cleanup()
            shutil.rmtree(server.data_dir, ignore_errors=True)
            if attempt + 1 == attempts or "address already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def etcd_server(workdir: Path | None = None, timeout: float = 15.0) -> Iterator[EtcdServer]:
    server = start_etcd(workdir, timeout)
    try:
        yield server
    finally:
        server.cleanup()
