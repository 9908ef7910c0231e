"""Real vLLM engines as subprocesses of the tests, run by the vLLM venv (.venv-vllm, made by
scripts/setup-vllm.sh) so the test venv needs no vLLM: an offline engine driven through
tests/vllm_driver.py, and the OpenAI API server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.daemons import MINILM_DIR, REPO, child_env
from tests.vllm_driver import MARK, TEXTS

__all__ = ["MARK", "TEXTS", "VllmDriver", "VllmServer", "bare_model_dir", "run_trainer", "vllm_python"]


def vllm_python() -> str | None:
    """The vLLM venv's interpreter: $TENSORD_VLLM_PYTHON, else REPO/.venv-vllm/bin/python."""
    path = os.environ.get("TENSORD_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    return path if os.access(path, os.X_OK) else None


def vllm_python_or_skip() -> str:
    """The vLLM interpreter for a test module; skipped with TENSORD_SKIP_VLLM=1 or without the
    venv, except in CI, which must have set it up."""
    import pytest

    if os.environ.get("TENSORD_SKIP_VLLM") == "1":
        pytest.skip("TENSORD_SKIP_VLLM=1")
    path = vllm_python()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must set up vLLM (scripts/setup-vllm.sh) before these tests")
        pytest.skip("no vLLM venv: run scripts/setup-vllm.sh")
    return path


def engine_env(socket_path: str, **extra: str) -> dict[str, str]:
    # One engine at a time shares two cores with the tests; keep vLLM quiet about what it
    # cannot find here and never let it reach a hub.
    return child_env(TENSORD_SOCKET=socket_path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def bare_model_dir(tmp: Path, weights: Path | None = None, *, source: Path | None = None) -> Path:
    """A copy of a model directory (default: MiniLM's; config, tokenizer) with no weight file,
    or with `weights` as its model.safetensors."""
    source = source if source is not None else MINILM_DIR
    assert source is not None
    tmp.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (shutil.copytree if item.is_dir() else shutil.copy)(item, tmp / item.name)
    if weights is not None:
        shutil.copy(weights, tmp / "model.safetensors")
    return tmp


def references(python: str, command: str, dirs: list[Path], log: Path, timeout: float = 600) -> list[Any]:
    """What fresh engines loading each directory's files with vLLM's own loader compute, one
    process for all (`tests/vllm_driver.py` COMMAND: "reference" embeds, "reference-tokens"
    generates)."""
    proc = _Proc([python, "tests/vllm_driver.py", command, *map(str, dirs)], engine_env("/nonexistent.sock"), log)
    try:
        assert proc.proc.wait(timeout) == 0, proc.tail()
    finally:
        proc.close()
    (line,) = [x for x in proc.output().splitlines() if x.startswith(MARK + "RESULT ")]
    return list(json.loads(line.split("RESULT ", 1)[1]))


def run_trainer(socket_path: str, *args: str) -> str:
    """Run tests/trainer.py in its own process (the test venv); returns its stdout."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.trainer", *args],
        env=child_env(TENSORD_SOCKET=socket_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"trainer failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.strip()


class _Proc:
    """A child with its output in a log file, killed (with its process group) on close."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path, *, stdin: bool = False) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=REPO,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 6000) -> str:
        return self.output()[-n:]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 15)
                self.proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._out.close()


class VllmDriver(_Proc):
    """``vllm_driver.py serve``: an offline `vllm.LLM` with ``load_format="tensord"``."""

    def __init__(
        self,
        python: str,
        model_dir: Path,
        options: dict[str, Any] | None,
        socket_path: str,
        log: Path,
        settings: dict[str, Any] | None = None,
    ) -> None:
        cmd = [python, str(REPO / "tests" / "vllm_driver.py"), "serve", str(model_dir), json.dumps(options)]
        cmd += [json.dumps(settings)] if settings is not None else []
        super().__init__(cmd, engine_env(socket_path), log, stdin=True)
        self._seen = 0  # marked lines already consumed

    def _marked(self) -> list[str]:
        return [line[len(MARK) :] for line in self.output().splitlines() if line.startswith(MARK)]

    def _next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self._marked()
            if len(lines) > self._seen:
                self._seen += 1
                return lines[self._seen - 1]
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"no answer from the engine in {timeout}s:\n{self.tail()}")

    def ready(self, timeout: float = 240) -> dict[str, Any]:
        line = self._next(timeout)
        assert line.startswith("READY "), line
        return json.loads(line[len("READY ") :])

    def call(self, op: str, timeout: float = 120, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        self.proc.stdin.flush()
        reply = json.loads(self._next(timeout))
        if "error" in reply:
            raise RuntimeError(f"engine: {reply['error']}\n{self.tail(3000)}")
        return reply

    def wait_exit(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"the engine did not exit in {timeout}s:\n{self.tail()}") from exc


class VllmServer(_Proc):
    """``python -m vllm.entrypoints.openai.api_server`` on a free loopback port."""

    def __init__(self, python: str, args: list[str], socket_path: str, log: Path, **env: str) -> None:
        self.port = _free_port()
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(cmd + args, engine_env(socket_path, **env), log)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not ready in {timeout}s:\n{self.tail()}")

    def request(self, path: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{path}: HTTP {exc.code}: {exc.read()[:2000]!r}\n{self.tail(3000)}") from exc

    def embed(self, model: str) -> list[list[float]]:
        out = self.request("/v1/embeddings", {"model": model, "input": TEXTS})
        return [row["embedding"] for row in sorted(out["data"], key=lambda r: r["index"])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (vLLM runs the model in a child process)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def memfd_mappings(pid: int) -> dict[str, int]:
    """Summed over a process tree, in bytes, for its mappings of memfds (the daemon's host
    slabs): their size, and their resident and proportional pages."""
    totals = {"size": 0, "rss": 0, "pss": 0}
    keys = {"Size:": "size", "Rss:": "rss", "Shared_Hugetlb:": "rss", "Private_Hugetlb:": "rss", "Pss:": "pss"}
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/smaps").read_text().splitlines()
        except OSError:
            continue
        inside = False
        for line in lines:
            head = line.split(maxsplit=1)[0] if line else ""
            if "-" in head and not head.endswith(":"):  # a mapping's first line
                inside = "/memfd:" in line
            elif inside and head in keys:
                totals[keys[head]] += int(line.split()[1]) * 1024
    return totals


def copied_bytes(pid: int) -> int:
    """Bytes of a process tree's mappings of memfds whose pages are its own copies (copied on
    write, huge pages included): present pages that /proc/PID/pagemap does not mark as file or
    shared pages."""
    total = 0
    for p in process_tree(pid):
        try:
            maps = Path(f"/proc/{p}/maps").read_text().splitlines()
            pagemap = open(f"/proc/{p}/pagemap", "rb")  # noqa: SIM115 - closed below
        except OSError:
            continue
        with pagemap:
            for line in maps:
                if "/memfd:" not in line:
                    continue
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                pagemap.seek(start // 4096 * 8)
                entries = struct.unpack(f"<{(end - start) // 4096}Q", pagemap.read((end - start) // 4096 * 8))
                total += 4096 * sum(1 for e in entries if e >> 63 and not (e >> 61) & 1)
    return total
