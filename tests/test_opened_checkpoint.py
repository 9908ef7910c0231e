"""A checkpoint the daemon reads by path is opened once, inside its allowed root: a file
swapped for a link to somewhere else between the check and the open is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensord import opened_checkpoint
from tensord.checkpoint import read_passed_checkpoint
from tensord_contract.errors import InvalidArgument, Unauthorized


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "models"
    root.mkdir()
    save_file({"w": torch.ones(4)}, root / "m.safetensors")
    save_file({"secret": torch.arange(4.0)}, tmp_path / "secret.safetensors")
    return root, root / "m.safetensors", tmp_path / "secret.safetensors"


def test_the_files_inside_are_opened_and_read_through_their_descriptors(files) -> None:
    root, inside, _ = files
    with opened_checkpoint.opened_inside(str(inside), str(root)) as (passed, unchanged):
        assert [label for label, _ in passed] == [str(inside)]
        assert [t.name for t in read_passed_checkpoint(passed)] == ["w"]
        unchanged()
        save_file({"w": torch.ones(5)}, root / "new.safetensors")
        os.replace(root / "new.safetensors", inside)  # the path names another file now
        unchanged()  # the file open did not change, and it is what is read
        with open(f"/proc/self/fd/{passed[0][1]}", "ab") as f:
            f.write(b"x")  # the file open grows
        with pytest.raises(InvalidArgument, match="changed while it was read"):
            unchanged()
    with pytest.raises(OSError):
        os.fstat(passed[0][1])  # closed on exit


def test_a_link_swapped_between_the_check_and_the_open_is_refused(files, monkeypatch) -> None:
    root, inside, outside = files
    link = root / "link.safetensors"
    os.symlink(outside, link)  # at the open it leads outside; by the check, inside again
    real_open = os.open

    def open_then_swap(path, flags, *args):  # type: ignore[no-untyped-def]
        fd = real_open(path, flags, *args)
        if str(path) == str(link):
            os.unlink(link)
            os.symlink(inside, link)
        return fd

    monkeypatch.setattr(opened_checkpoint.os, "open", open_then_swap)
    with pytest.raises(InvalidArgument, match="replaced while it was opened"):
        opened_checkpoint._open_inside(str(link), str(root))


def test_a_link_leading_outside_is_refused(files) -> None:
    root, _, outside = files
    os.symlink(outside, root / "out.safetensors")
    with pytest.raises(Unauthorized, match="outside"):
        opened_checkpoint._open_inside(str(root / "out.safetensors"), str(root))
    with (
        pytest.raises(InvalidArgument, match="outside"),  # the header check says so first
        opened_checkpoint.opened_inside(str(root / "out.safetensors"), str(root)),
    ):
        pass


def test_a_cancelled_caller_waits_for_its_thread_to_end() -> None:
    """So that descriptors a thread reads are closed only once it is done with them."""
    import asyncio
    import threading
    import time

    ended = threading.Event()

    def slow() -> int:
        time.sleep(0.3)
        ended.set()
        return 1

    async def main() -> bool:
        task = asyncio.ensure_future(opened_checkpoint.to_the_end(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ended.is_set()

    assert asyncio.run(main())
