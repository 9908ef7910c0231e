"""Files that must survive a crash: written to a fresh temporary file (whatever stood at its
name, a link included, is removed first, never written through), fsync-ed, renamed over the
old one, the directory fsync-ed; read without following links or waiting (a FIFO is refused)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from tensord.regular_files import open_regular


def read_file(path: Path, limit: int | None = None) -> bytes:
    """A state file's bytes; never follows a link, never waits (a FIFO is refused, not read).
    `limit`: a file of more bytes is refused unread (a damaged one must not fill memory)."""
    with os.fdopen(open_regular(path, follow=False), "rb") as f:
        info = os.fstat(f.fileno())
        if limit is None:
            return f.read()
        data = f.read(limit + 1) if info.st_size <= limit else b""
        if info.st_size > limit or len(data) > limit:
            size = max(info.st_size, len(data))
            raise OSError(errno.EFBIG, f"{size} bytes or more, larger than any such state file ({limit})")
        return data


#: read failures that say what the file is (none, a link, not a regular file, too large), not
#: that it could not be read this time (permissions, I/O, out of descriptors or memory)
_SETTLED = (errno.ENOENT, errno.ELOOP, errno.EINVAL, errno.EFBIG)


def unsettled(exc: BaseException | None) -> bool:
    """Whether a read failed for a reason that may pass (the file may well be intact)."""
    return isinstance(exc, OSError) and exc.errno not in _SETTLED


def why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
        return "a symbolic link: state files are never links"
    return exc.strerror or str(exc)


def not_a_directory(path: Path) -> str:
    """What `path` is when it is not a directory of its own: "a symbolic link" (never
    followed: what it points to is not the state directory's), "not a directory"; "" for a
    directory, or nothing yet."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ""
    if stat.S_ISDIR(mode):
        return ""
    return "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"


def made_a_directory(path: Path) -> None:
    """Replace what stands at `path` (a link, a file: `not_a_directory`) by an empty directory."""
    os.unlink(path)
    path.mkdir(mode=0o700)


def remove_file(directory: Path, filename: str) -> None:
    try:
        os.unlink(directory / filename)
    except FileNotFoundError:
        return
    fsync_directory(directory)


def write_file(directory: Path, filename: str, data: bytes) -> None:
    """Replace one file durably: temporary file, fsync, rename, fsync the directory."""
    final = directory / filename
    temporary = directory / f".{filename}.tmp"
    with contextlib.suppress(FileNotFoundError):  # a crash's leftover, or a link: never written through
        os.unlink(temporary)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
