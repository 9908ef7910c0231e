"""Real tensord daemons as subprocesses, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sdk

REPO = Path(__file__).resolve().parent.parent


class DaemonProcess:
    def __init__(self, workdir: Path, node: str = "n1", config: str | None = None,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.workdir, self.node = workdir, node
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / f"{node}.sock")
        self.log = workdir / f"{node}.log"
        self.config = None
        if config is not None:
            self.config = workdir / f"{node}.toml"
            self.config.write_text(config)
        self.env = {**os.environ, "TENSORD_SOCKET": self.socket, "TENSORD_LOG_LEVEL": "debug",
                    "PYTHONPATH": str(REPO), **(env or {})}  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        cmd = [sys.executable, "-m", "tensord", "serve", "--node", self.node]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if _connectable(self.socket):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not listen within {timeout}s:\n{self.log.read_text()}")

    def client(self, **kw: Any) -> sdk.Client:
        return sdk.Client(self.socket, **kw)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit code (SIGKILL if it hangs)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def _connectable(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
