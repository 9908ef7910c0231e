"""`load` with passed descriptors (SCM_RIGHTS) that no honest `tensord load` sends: character
devices, pipes, descriptors not open for reading, `O_PATH` ones, a /proc file (regular, size
0, endless), a descriptor not at offset 0, a memfd (files cut or grown while the daemon reads
them: `test_load_passing.py`). Each is refused with InvalidArgument and leaves no version,
reservation or descriptor behind, or, where the bytes are a checkpoint, loads them bit-exact."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sdk
from sdk.catalogue import CatalogueClient

WEIGHTS = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(7, 3, dtype=torch.bfloat16)}


def _describe(fd: int, path: str) -> dict[str, object]:
    st = os.fstat(fd)
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _load(daemon, fd: int, path: str, name: str, **kw: object) -> dict:
    with CatalogueClient(daemon.socket) as c:
        return c.load_passed([fd], path=path, name=name, files=[_describe(fd, path)], **kw)


def _nothing_left(daemon, name: str, fds_before: int) -> None:
    with CatalogueClient(daemon.socket) as c:
        assert name not in {s["name"] for s in c.ls()}
        status = c.status()
        assert status["reservations"] == 0 and status["loads"] == []
    deadline = time.monotonic() + 5  # a slab freed after a delete closes its memfd soon after
    while daemon.open_fds() > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.open_fds() <= fds_before  # the passed descriptor was closed


def _warm(daemon, checkpoint: str) -> None:
    """One load and delete first: what the daemon opens once, on its first load, stays open."""
    fd = os.open(checkpoint, os.O_RDONLY)
    try:
        _load(daemon, fd, checkpoint, "hostile/warm")
    finally:
        os.close(fd)
    with CatalogueClient(daemon.socket) as c:
        c.delete("hostile/warm")


@pytest.fixture
def checkpoint(tmp_path) -> str:
    path = tmp_path / "w.safetensors"
    save_file(WEIGHTS, path)
    return str(path)


def _pipe(checkpoint: str) -> Iterator[int]:
    r, w = os.pipe()
    os.write(w, Path(checkpoint).read_bytes()[:4096])  # a checkpoint's first bytes, then nothing
    yield r
    os.close(w)


OPENERS: dict[str, tuple[Callable[[str], Iterator[int]], str]] = {
    "/dev/zero": (lambda _: iter([os.open("/dev/zero", os.O_RDONLY)]), "special file"),
    "/dev/null": (lambda _: iter([os.open("/dev/null", os.O_RDONLY)]), "special file"),
    "pipe": (_pipe, "FIFO"),
    "write-only": (lambda p: iter([os.open(p, os.O_WRONLY)]), "not open for reading"),
    "O_PATH": (lambda p: iter([os.open(p, os.O_PATH)]), "cannot read"),
    "/proc file": (lambda _: iter([os.open("/proc/self/status", os.O_RDONLY)]), "header length"),
}


@pytest.mark.parametrize("kind", list(OPENERS))
def test_descriptors_that_are_no_checkpoint_are_refused(daemon, checkpoint: str, kind: str) -> None:
    opener, match = OPENERS[kind]
    opened = opener(checkpoint)
    fd = next(opened)
    name = f"hostile/{kind.strip('/').replace('/', '-').replace('_', '-').replace(' ', '-').lower()}"
    try:
        _warm(daemon, checkpoint)
        fds_before = daemon.open_fds()
        with pytest.raises(sdk.InvalidArgument, match=match):
            _load(daemon, fd, checkpoint, name)
    finally:
        os.close(fd)
        next(opened, None)
    _nothing_left(daemon, name, fds_before)


def test_a_descriptor_not_at_offset_zero_and_a_memfd_load_the_checkpoint(daemon, client, checkpoint: str) -> None:
    fd = os.open(checkpoint, os.O_RDONLY)
    memfd = os.memfd_create("weights")
    try:
        os.lseek(fd, 100, os.SEEK_SET)
        os.write(memfd, Path(checkpoint).read_bytes())  # the memfd's offset is its end
        for name, passed in (("hostile/offset", fd), ("hostile/memfd", memfd)):
            assert _load(daemon, passed, checkpoint, name)["version"] == 1
            got = client.get(name)
            assert sorted(got) == sorted(WEIGHTS) and all(torch.equal(got[k], WEIGHTS[k]) for k in WEIGHTS)
    finally:
        os.close(fd)
        os.close(memfd)


def test_a_checkpoint_directory_whose_index_is_a_fifo_is_refused(start_daemon, tmp_path) -> None:
    """A FIFO where a directory's index would be (under an allowed root, read by path) is
    refused at once: opening it used to block a daemon thread for ever, and with it the load
    and the daemon's stop."""
    models = tmp_path / "models"
    (models / "m").mkdir(parents=True)
    save_file(WEIGHTS, models / "m" / "model-00001.safetensors")
    os.mkfifo(models / "m" / "model.safetensors.index.json")
    d = start_daemon("fifo-index", config=f'[ingest]\nallowed_roots = ["{models}"]\n')
    with CatalogueClient(d.socket, timeout=20) as c:
        with pytest.raises(sdk.InvalidArgument, match="index is not a regular file"):
            c.load_checkpoint(str(models / "m"), "hostile/fifo-index")
        assert c.ls() == [] and c.status()["loads"] == []
    assert d.stop(timeout=10) == 0
