"""Checkpoints the daemon reads itself (load): files the caller opened and passed over the Unix
socket, or paths under the directories the config allows."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

from tensord.ingest import Progress, default_threads
from tensord.ingest.store_sink import load_on_daemon
from tensord.opened_checkpoint import identity, opened_inside, to_the_end, watch
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
        with contextlib.ExitStack() as held:
            if req.files is None:  # read through descriptors opened once, inside the root
                path, root = await self._allowed(path)
                passed, unchanged = await to_the_end(held.enter_context, opened_inside(path, root))
            else:
                passed, unchanged = _take_passed(session, req.files)
                held.callback(_close_all, passed)
            options.update(passed=passed, unchanged=unchanged)
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
                    threads=threads,
                    logger=log,
                    track=track,
                    **options,
                )
            finally:
                self._loads.pop(load_id, None)
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
        passed = [(f.path, fd) for f, fd in zip(files, fds, strict=True)]
        for f, fd in zip(files, fds, strict=True):
            got = identity(fd)
            if got[0] >= 0 and got[:2] != (f.size, f.mtime_ns):  # not a regular file: the header reader says so
                raise InvalidArgument(f"{f.path}: changed since it was opened (size or modification time)", path=f.path)
        return passed, watch(passed)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _close_all(passed: list[tuple[str, int]]) -> None:
    for _, fd in passed:
        os.close(fd)
