"""`tensord load` hands a local daemon the files it opened (SCM_RIGHTS): the daemon reads what
the caller may read, never opens a path for it, and refuses descriptors that are not regular
files, truncated files and files that change under the load, leaving no version."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import sdk
from sdk.catalogue import CatalogueClient
from tests.daemons import REPO, child_env, tensord
from tests.etcd_server import free_port


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.attn.q.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "layers.0.mlp.up.weight": torch.randn(48, 32, generator=g),
        "layers.0.norm.weight": torch.randn(32, generator=g).half(),
        "embed.weight": torch.randint(-100, 100, (50, 32), generator=g, dtype=torch.int32),
        "scale": torch.tensor(3.5),
    }


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, t in want.items():
        assert got[k].dtype == t.dtype, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def _describe(fd: int, path: str) -> dict[str, object]:
    st = os.fstat(fd)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _unchanged(daemon, *names: str) -> None:
    with CatalogueClient(daemon.socket) as c:
        listed = {s["name"] for s in c.ls()}
        assert not listed & set(names), listed
        status = c.status()
        assert status["reservations"] == 0 and status["loads"] == []


def test_a_file_outside_the_roots_loads_bit_exactly(daemon, client, tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    want = _weights()
    save_file(want, path)
    out = tensord("load", str(path), "--name", "passed/m", socket=daemon.socket)
    assert out.returncode == 0 and out.stdout.startswith("passed/m v1:"), out.stderr
    _same(dict(client.get("passed/m", verify=True)), want)
    assert client.info("passed/m")["origin"] == f"file:{path}"
    # the daemon's roots do not include it: the path route is refused
    with pytest.raises(sdk.Unauthorized):
        client.load_checkpoint(str(path), "passed/by-path")


def test_a_directory_with_an_index_passes_each_shard(daemon, client, tmp_path) -> None:
    want = _weights(1)
    model = tmp_path / "hf"
    model.mkdir()
    names = sorted(want)
    parts = {"a.safetensors": names[:2], "b.safetensors": names[2:]}
    for file, keys in parts.items():
        save_file({k: want[k] for k in keys}, model / file)
    index = {"weight_map": {k: file for file, keys in parts.items() for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tensord("load", str(model), "--name", "passed/hf", "--quiet", socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    _same(dict(client.get("passed/hf", verify=True)), want)


def test_tp_sharding_on_the_daemon(daemon, client, tmp_path) -> None:
    path = tmp_path / "tp.safetensors"
    want = {"q_proj.weight": torch.randn(8, 6), "o_proj.weight": torch.randn(6, 8), "norm.weight": torch.randn(6)}
    save_file(want, path)
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\npattern = "q_proj"\nsplit = 0\n[[rule]]\npattern = "o_proj"\nsplit = 1\n')
    out = tensord("load", str(path), "--name", "passed/tp", "--tp", "2", "--rules", str(rules), socket=daemon.socket)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "passed/tp/tp0 v1"
    for rank in range(2):
        got = client.get(f"passed/tp/tp{rank}", verify=True)
        assert torch.equal(got["q_proj.weight"], want["q_proj.weight"].chunk(2, 0)[rank])
        assert torch.equal(got["o_proj.weight"], want["o_proj.weight"].chunk(2, 1)[rank])
        assert torch.equal(got["norm.weight"], want["norm.weight"])


@pytest.mark.parametrize("tp", [[], ["--tp", "2"]])
def test_the_cli_load_path_imports_no_torch(daemon, tmp_path, tp: list[str]) -> None:
    """Not even numpy, with --tp too (its rules are checked by `tensord.sharding_rules`)."""
    path = tmp_path / "t.safetensors"
    save_file(_weights(2), path)
    code = (
        "import sys\n"
        "from tensord.cli import main\n"
        f"rc = main(['load', {str(path)!r}, '--name', 'passed/notorch', *{tp!r}])\n"
        "bad = sorted(m for m in ('torch', 'numpy', 'safetensors', 'tensord.ingest') if m in sys.modules)\n"
        "print(rc, bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(TENSORD_SOCKET=daemon.socket),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert out.stdout.strip().splitlines()[-1] == "0 []", (out.stdout, out.stderr)


def test_a_file_the_caller_cannot_read_is_refused(daemon, tmp_path) -> None:
    path = tmp_path / "secret.safetensors"
    save_file(_weights(3), path)
    os.chmod(path, 0)
    cmd = [sys.executable, "-m", "tensord", "load", str(path), "--name", "passed/secret"]
    if os.geteuid() == 0:  # root reads every file: run the command without that power
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv is missing")
        drop = "-dac_override,-dac_read_search"
        cmd = ["setpriv", "--bounding-set", drop, "--inh-caps", drop, *cmd]
    env = child_env(TENSORD_SOCKET=daemon.socket)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 1 and "cannot read it: Permission denied" in out.stderr, out.stderr
    _unchanged(daemon, "passed/secret")


@pytest.mark.parametrize("kind", ["directory", "fifo", "socket"])
def test_a_descriptor_that_is_not_a_regular_file_is_refused(daemon, tmp_path, kind) -> None:
    sock = None
    if kind == "directory":
        fd = os.open(tmp_path, os.O_RDONLY)
    elif kind == "fifo":
        os.mkfifo(tmp_path / "pipe")
        fd = os.open(tmp_path / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = sock.fileno()
    try:
        with CatalogueClient(daemon.socket) as c:
            args = {"path": str(tmp_path / "x"), "name": f"passed/{kind}", "files": [_describe(fd, "x")]}
            with pytest.raises(sdk.InvalidArgument, match=f"passed descriptor is a {kind.replace('fifo', 'FIFO')}"):
                c.load_passed([fd], **args)
    finally:
        if sock is not None:
            sock.close()
        else:
            os.close(fd)
    _unchanged(daemon, f"passed/{kind}")


def test_a_truncated_file_is_refused(daemon, tmp_path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file(_weights(4), path)
    os.truncate(path, os.path.getsize(path) - 40)
    out = tensord("load", str(path), "--name", "passed/cut", socket=daemon.socket)
    assert out.returncode == 1 and "truncated" in out.stderr, out.stderr
    _unchanged(daemon, "passed/cut")


def test_a_file_changed_after_it_was_opened_is_refused(daemon, tmp_path) -> None:
    path = tmp_path / "moved.safetensors"
    save_file(_weights(5), path)
    fd = os.open(path, os.O_RDONLY)
    try:
        before = _describe(fd, str(path))
        with open(path, "r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(b"\x7f" * 8)
        os.utime(path, ns=(time.time_ns(), int(before["mtime_ns"]) + 1_000_000))  # type: ignore[call-overload]
        with CatalogueClient(daemon.socket) as c, pytest.raises(sdk.InvalidArgument, match="changed since"):
            c.load_passed([fd], path=str(path), name="passed/moved", files=[before])
    finally:
        os.close(fd)
    _unchanged(daemon, "passed/moved")


def _alter(path, change: str) -> None:
    """Change a file as a writer would while it is read: rewrite its last bytes (and move its
    mtime on), cut it to half, or append to it."""
    if change == "modify":
        with open(path, "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"\x01\x02\x03\x04")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    elif change == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        with open(path, "ab") as f:
            f.write(b"\0" * 4096)


@pytest.mark.parametrize("change", ["modify", "truncate", "grow"])
def test_a_file_changed_during_the_load_is_refused(daemon, tmp_path, change: str) -> None:
    """The file is modified, cut or grown once the daemon shows the load in progress (past its
    first check): the check before the commit (or the short read) refuses it, and nothing is
    left. Retried with a larger file if the load ended first."""
    name = f"passed/live-{change}"
    for size in (32 << 20, 128 << 20, 512 << 20):
        path = tmp_path / "live.safetensors"
        save_file({"w": torch.arange(size // 4, dtype=torch.int32)}, path)
        fd = os.open(path, os.O_RDONLY)
        done, modified = threading.Event(), threading.Event()

        def modify(path=path, done=done, modified=modified) -> None:
            with CatalogueClient(daemon.socket) as watcher:
                while not done.is_set():
                    if any(x["name"] == name for x in watcher.status()["loads"]):
                        _alter(path, change)
                        modified.set()
                        return

        thread = threading.Thread(target=modify)
        thread.start()
        try:
            with CatalogueClient(daemon.socket) as c:
                try:
                    c.load_passed([fd], path=str(path), name=name, files=[_describe(fd, str(path))], threads=1)
                    refused = None
                except sdk.InvalidArgument as exc:
                    refused = exc
        finally:
            done.set()
            thread.join()
            os.close(fd)
        if refused is None and not modified.is_set():
            with CatalogueClient(daemon.socket) as c:
                c.delete(name)
            continue  # the load was over before the change: try a larger file
        assert refused is not None, "a file changed under the load became a version"
        assert "changed while it was read" in refused.message or "truncated" in refused.message
        _unchanged(daemon, name)
        return
    pytest.skip("every load ended before the file could be changed")


def test_bad_load_arguments_and_stray_descriptors_change_nothing(daemon, tmp_path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file(_weights(6), path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with CatalogueClient(daemon.socket) as c:
            c.status()
            fds_before = daemon.open_fds()
            good = {"path": str(path), "name": "passed/bad", "files": [_describe(fd, str(path))]}
            for bad, fds in (
                ({"files": []}, [fd]),  # fewer descriptions than descriptors
                ({}, []),  # described, not passed
                ({"files": [{"path": 5, "size": 1, "mtime_ns": 1}]}, [fd]),
                ({"files": [{"path": "x", "size": -1, "mtime_ns": 1}]}, [fd]),
                ({"files": ["x"]}, [fd]),
                ({"tp": 0, "rules": {}}, [fd]),
                ({"tp": 2}, [fd]),
                ({"tp": 2, "rules": {"rule": [{"pattern": "(", "split": 0}]}}, [fd]),
                ({"threads": 0}, [fd]),
            ):
                with pytest.raises(sdk.InvalidArgument):
                    c.load_passed(fds, **{**good, **bad})
            for _ in range(3):  # descriptors passed with an op that takes none are closed
                c._conn().call("status", pass_fds=[fd] * 8)
            assert daemon.open_fds() == fds_before
    finally:
        os.close(fd)
    _unchanged(daemon, "passed/bad")


def test_over_tcp_the_command_loads_in_its_own_process(start_daemon, tmp_path) -> None:
    port = free_port()
    config = f'[daemon]\nlisten = "127.0.0.1:{port}"\ntoken = "t0ken"\n[transport]\nprotocol = "tcp"\n'
    d = start_daemon("tcp", config=config)
    path = tmp_path / "far.safetensors"
    want = _weights(7)
    save_file(want, path)
    env = child_env(TENSORD_ADDR=f"127.0.0.1:{port}", TENSORD_TOKEN="t0ken")
    env.pop("TENSORD_SOCKET", None)
    cmd = [sys.executable, "-m", "tensord", "load", str(path), "--name", "passed/far", "--quiet"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.startswith("passed/far v1:"), out.stderr
    with d.client() as c:
        _same(dict(c.get("passed/far", verify=True)), want)
