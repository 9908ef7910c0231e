"""Checkpoints the daemon reads itself (load): files the caller opened and passed over the Unix
socket, or paths under the directories the config allows."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from tensord.ingest import Progress, default_threads
from tensord.ingest.store_sink import load_on_daemon
from tensord.ops.args import args as _args
from tensord.ops.args import is_int
from tensord.ops.base import Ops
from tensord.rpc import Session, brief
from tensord.sharding import parse_rules
from tensord_contract.errors import InvalidArgument, Unauthorized
from tensord_contract.names import check_name

log = logging.getLogger(__name__)
MAX_TP = 1024
_load_ids = itertools.count(1)


class FileOps(Ops):
    async def op_load(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Load a checkpoint the daemon reads itself: the files passed with the request
        (`files` describes each descriptor: the caller's path, size and mtime_ns when it
        opened it), else `path`, which must lie under ingest.allowed_roots. With `tp` and
        `rules` (sharding rules as parsed TOML), split into sets NAME/tp0 .. NAME/tp{tp-1}."""
        path, name, device, threads, files, tp, rules = _args(
            request, "path", "name", optional=("device", "threads", "files", "tp", "rules")
        )
        check_name(name)
        if not isinstance(path, str) or not path or "\0" in path:
            raise InvalidArgument("path must be a non-empty string without NUL characters")
        if device is not None and not isinstance(device, str):
            raise InvalidArgument("device must be a string like 'cpu' or 'cuda:0'")
        if threads is None:
            threads = default_threads(device or "cpu")
        if not is_int(threads, 1, 64):
            raise InvalidArgument("threads must be an integer from 1 to 64")
        options: dict[str, Any] = {}
        if tp is not None or rules is not None:
            if not is_int(tp, 1, MAX_TP):
                raise InvalidArgument(f"tp must be an integer from 1 to {MAX_TP} (with rules)")
            if not isinstance(rules, dict):
                raise InvalidArgument("rules must be a map: sharding rules as parsed from TOML")
            options.update(tp=tp, rules=parse_rules(rules, source="rules"))
        if files is None:
            path, root = await self._allowed(path)
        else:
            passed, unchanged = _take_passed(session, files)
            options.update(passed=passed, unchanged=unchanged)
            root = None
        load_id = next(_load_ids)

        def track(progress: Progress) -> None:
            self._loads[load_id] = (name, progress)

        try:
            loaded = await load_on_daemon(
                self.store,
                self.metrics,
                session,
                path,
                name,
                device=device or "cpu",
                root=root,
                threads=threads,
                logger=log,
                track=track,
                **options,
            )
        finally:
            self._loads.pop(load_id, None)
            for _, fd in options.get("passed", ()):
                os.close(fd)
        sets = [[n, v] for n, v in loaded.sets]
        return {"version": loaded.sets[0][1], "nbytes": loaded.nbytes, "sets": sets}, []

    async def _allowed(self, path: str) -> tuple[str, str]:
        """`path` resolved, and the allowed root it lies under; Unauthorized if none."""
        try:
            real = await asyncio.to_thread(os.path.realpath, path)
        except OSError as exc:  # a path too long, say
            raise InvalidArgument(f"path {brief(path)}: {exc.strerror or exc}") from None
        root = next((r for r in self.allowed_roots if real == r or real.startswith(r + os.sep)), None)
        if root is None:
            raise Unauthorized(
                f"{path} is not under a directory this daemon may read "
                f"(ingest.allowed_roots: {list(self.allowed_roots) or 'none'}); "
                "a local `tensord load` passes the open file instead"
            )
        return real, root


def _take_passed(session: Session, files: object) -> tuple[list[tuple[str, int]], Callable[[], None]]:
    """The descriptors passed with this request, as (label, fd), now owned by the caller; and a
    check that they still are the files the client described (size, mtime) and first found."""
    fds, session.passed[:] = list(session.passed), []
    try:
        if not isinstance(files, list) or len(files) != len(fds) or not fds:
            raise InvalidArgument(f"files must describe each of the {len(fds)} descriptors passed with the request")
        labels: list[str] = []
        expected: list[tuple[int, int]] = []
        for f in files:
            label, size, mtime = (f.get("path"), f.get("size"), f.get("mtime_ns")) if isinstance(f, dict) else (0, 0, 0)
            if not isinstance(label, str) or not label or "\0" in label or len(label) > 4096:
                raise InvalidArgument("each file needs a path: a non-empty string without NUL characters")
            if not is_int(size, 0) or not is_int(mtime):
                raise InvalidArgument(f"file {brief(label)}: size and mtime_ns must be integers")
            labels.append(label)
            expected.append((size, mtime))
        if len(set(labels)) != len(labels):
            raise InvalidArgument("the files' paths must be distinct")
        first = [_identity(label, fd) for label, fd in zip(labels, fds, strict=True)]
        for label, got, want in zip(labels, first, expected, strict=True):
            if got[0] >= 0 and got[:2] != want:
                raise InvalidArgument(f"{label}: changed since it was opened (size or modification time)", path=label)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise

    def unchanged() -> None:
        for label, fd, before in zip(labels, fds, first, strict=True):
            if _identity(label, fd) != before:
                raise InvalidArgument(f"{label}: changed while it was read (size or modification time)", path=label)

    return list(zip(labels, fds, strict=True)), unchanged


def _identity(label: str, fd: int) -> tuple[int, int, int, int]:
    """(size, mtime_ns, device, inode) of a passed regular file."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return (-1, -1, st.st_dev, st.st_ino)  # refused with a clear message by the header reader
    return (st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)
