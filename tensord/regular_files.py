"""Files opened to be read, never waiting on what is not one: a FIFO (or a device) where a file
was expected must not hang the open, so the open does not block, and the descriptor is kept
(made blocking) only for a regular file. No numpy: the CLI uses it too."""

from __future__ import annotations

import errno
import os
import stat


class NotRegular(OSError):
    """What stands at the path is no regular file; `kind` says what it is."""

    def __init__(self, kind: str) -> None:
        super().__init__(errno.EINVAL, f"not a regular file ({kind})")
        self.kind = kind


def kind(mode: int) -> str:
    """What a file of this mode is, when it is no regular file."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def open_regular(path: str | os.PathLike[str], *, follow: bool = True) -> int:
    """`path` opened read-only (`follow`: through a final symbolic link), if it is a regular file;
    NotRegular otherwise, other OSErrors as `os.open` raises them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(kind(mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
