"""A checkpoint the daemon reads by path, opened once: its files' descriptors, each proven to lie
inside the allowed root, are what the ingest reads (`ingest.load(passed=...)`), never the paths
again. A file swapped for a link to somewhere else between the check and the read is refused:
each file is opened first, then its path resolved and checked, then the resolved path's inode
compared with the open descriptor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tensord.checkpoint import read_checkpoint
from tensord.regular_files import NotRegular, open_regular
from tensord_contract.errors import InvalidArgument, NotFound, Unauthorized

Passed = list[tuple[str, int]]  # (label: the file's path, descriptor)
T = TypeVar("T")


@contextlib.contextmanager
def opened_inside(path: str, root: str) -> Iterator[tuple[Passed, Callable[[], None]]]:
    """The files of the checkpoint at `path` (a file, or a directory's shards), each opened and
    checked to be a regular file inside `root`; and a check that they are unchanged since (to
    call after reading, before committing). The descriptors are closed on exit."""
    files = list(dict.fromkeys(t.path for t in read_checkpoint(path, root=root)))
    passed: Passed = []
    try:
        for file in files:
            passed.append((file, _open_inside(file, root)))
        yield passed, watch(passed)
    finally:
        for _, fd in passed:
            os.close(fd)


def _open_inside(file: str, root: str) -> int:
    try:  # a FIFO swapped in must not hang the open
        fd = open_regular(file)
    except FileNotFoundError:
        raise NotFound(f"{file}: no such file", path=file) from None
    except NotRegular as exc:
        raise InvalidArgument(f"{file}: not a regular file but {exc.kind}", path=file) from None
    except OSError as exc:
        raise InvalidArgument(f"{file}: cannot read it: {exc.strerror or exc}", path=file) from None
    try:
        opened = os.fstat(fd)
        real, real_root = os.path.realpath(file), os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            raise Unauthorized(f"{file} resolves to {real}, outside {real_root}", path=file)
        now = os.stat(real)
        if (now.st_dev, now.st_ino) != (opened.st_dev, opened.st_ino):
            raise InvalidArgument(f"{file}: replaced while it was opened", path=file)
    except OSError as exc:  # the path resolved is gone again, say
        os.close(fd)
        raise InvalidArgument(f"{file}: replaced while it was opened ({exc.strerror or exc})", path=file) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def watch(passed: Sequence[tuple[str, int]]) -> Callable[[], None]:
    """A check that each file is what it was now (size, modification time, inode): it raises
    InvalidArgument naming the first that changed."""
    first = [identity(fd) for _, fd in passed]

    def unchanged() -> None:
        for (label, fd), before in zip(passed, first, strict=True):
            if identity(fd) != before:
                raise InvalidArgument(f"{label}: changed while it was read (size or modification time)", path=label)

    return unchanged


def identity(fd: int) -> tuple[int, int, int, int]:
    """(size, mtime_ns, device, inode) of an open regular file (-1 for the first two otherwise)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return (-1, -1, st.st_dev, st.st_ino)
    return (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


async def to_the_end(fn: Callable[..., T], *args: Any) -> T:
    """`asyncio.to_thread(fn, *args)`, except that a caller cancelled meanwhile waits for the
    thread to end before the cancellation goes on: descriptors the thread reads (or opens into
    an ExitStack of the caller's) are closed by the caller only once no thread uses them."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait([work])
        raise
