"""A peer process holding registered host memory, for tests and benchmarks.

Run as a script, it starts a ``MooncakeTransport``, fills a buffer with random bytes, registers
it and prints one JSON line ``{"session", "address", "length", "pid"}``. Then it answers lines
on stdin: ``sha256 OFFSET LENGTH`` prints the hex digest of that range; ``quit`` or end of input
closes the transport and exits. ``Holder`` spawns and drives such a process.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[1]


class Holder:
    """A holder process; use as a context manager (it is killed on exit)."""

    def __init__(
        self, size: int, *, protocol: str = "tcp", timeout_s: float | None = None, start_timeout: float = 60
    ) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--size", str(size), "--protocol", protocol]
        if timeout_s is not None:
            cmd += ["--timeout-s", str(timeout_s)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        try:
            line = self._readline(start_timeout)
            info = json.loads(line)
        except Exception:
            self.close()
            raise
        self.session: str = info["session"]
        self.address: int = info["address"]
        self.length: int = info["length"]
        self.pid: int = info["pid"]

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise TimeoutError(f"holder {self.proc.pid} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"holder {self.proc.pid} exited with {self.proc.poll()}")
        return line

    def sha256(self, offset: int, length: int, timeout: float = 30) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"sha256 {offset} {length}\n")
        self.proc.stdin.flush()
        return self._readline(timeout).strip()

    def signal(self, sig: int) -> None:
        """Send `sig`; for SIGSTOP, return once every thread of the holder has stopped (on a
        loaded machine that can take a while, and a thread still running would serve reads)."""
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not self._stopped():
                time.sleep(0.005)

    def _stopped(self) -> bool:
        tasks = Path(f"/proc/{self.proc.pid}/task")
        try:
            states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks.iterdir()]
        except OSError:
            return False
        return all(s in ("T", "t") for s in states)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # a pipe to a killed process may fail to flush
                    pipe.close()

    def __enter__(self) -> Holder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _serve(size: int, protocol: str, timeout_s: float | None) -> None:
    import torch

    from tensord_dataplane.transport.mooncake import MooncakeTransport

    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    buf = torch.empty(size, dtype=torch.uint8)
    buf.random_(0, 256)
    view = buf.numpy()
    with MooncakeTransport("127.0.0.1", protocol, timeout_s=timeout_s) as te:
        te.register(buf.data_ptr(), size)
        info = {"session": te.session, "address": buf.data_ptr(), "length": size, "pid": os.getpid()}
        print(json.dumps(info), flush=True)
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "quit":
                break
            if cmd == "sha256":
                offset, length = (int(a) for a in args)
                print(hashlib.sha256(view[offset : offset + length].data).hexdigest(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, required=True, help="bytes to hold")
    parser.add_argument("--protocol", default="tcp")
    parser.add_argument("--timeout-s", type=float, default=None)
    args = parser.parse_args()
    _serve(args.size, args.protocol, args.timeout_s)


if __name__ == "__main__":
    main()
