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
from tensord.ops.base import Ops
from tensord.rpc import Session, brief
from tensord.sharding import parse_rules
from tensord_contract.catalogue_messages import LoadReply, LoadRequest, PassedFile
from tensord_contract.errors import InvalidArgument, Unauthorized

log = logging.getLogger(__name__)
_load_ids = itertools.count(1)


class FileOps(Ops):
    async def op_load(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Load a checkpoint the daemon reads itself: the files passed with the request
        (`files` describes each descriptor: the caller's path, size and mtime_ns when it
        opened it), else `path`, which must lie under ingest.allowed_roots. With `tp` and
        `rules` (sharding rules as parsed TOML), split into sets NAME/tp0 .. NAME/tp{tp-1}."""
        req = LoadRequest.from_wire(request, InvalidArgument)
        path, name, device = req.path, req.name, req.device
        threads = req.threads if req.threads is not None else default_threads(device or "cpu")
        options: dict[str, Any] = {}
        if req.tp is not None and req.rules is not None:
            options.update(tp=req.tp, rules=parse_rules(req.rules, source="rules"))
        if req.files is None:
            path, root = await self._allowed(path)
        else:
            passed, unchanged = _take_passed(session, req.files)
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
        return LoadReply(loaded.sets[0][1], loaded.nbytes, list(loaded.sets)).to_wire(), []

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


def _take_passed(session: Session, files: tuple[PassedFile, ...]) -> tuple[list[tuple[str, int]], Callable[[], None]]:
    """The descriptors passed with this request, as (label, fd), now owned by the caller; and a
    check that they still are the files the client described (size, mtime; checked in form by
    `LoadRequest`) and first found."""
    fds, session.passed[:] = list(session.passed), []
    try:
        if len(files) != len(fds) or not fds:
            raise InvalidArgument(f"files must describe each of the {len(fds)} descriptors passed with the request")
        labels = [f.path for f in files]
        expected = [(f.size, f.mtime_ns) for f in files]
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
