"""Checkpoints the daemon reads itself (load), from directories the config allows."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from tensord.ingest import default_threads
from tensord.ingest.store_sink import load_on_daemon
from tensord.ops.args import args as _args
from tensord.ops.args import is_int
from tensord.ops.base import Ops
from tensord.rpc import Session, brief
from tensord_contract.errors import InvalidArgument, Unauthorized
from tensord_contract.names import check_name

log = logging.getLogger(__name__)


class FileOps(Ops):
    async def op_load(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        """Load a checkpoint the daemon reads itself, from a directory the config allows."""
        path, name, device, threads = _args(request, "path", "name", optional=("device", "threads"))
        check_name(name)
        if not isinstance(path, str) or not path or "\0" in path:
            raise InvalidArgument("path must be a non-empty string without NUL characters")
        if device is not None and not isinstance(device, str):
            raise InvalidArgument("device must be a string like 'cpu' or 'cuda:0'")
        if threads is None:
            threads = default_threads(device or "cpu")
        if not is_int(threads, 1, 64):
            raise InvalidArgument("threads must be an integer from 1 to 64")
        try:
            real = await asyncio.to_thread(os.path.realpath, path)
        except OSError as exc:  # a path too long, say
            raise InvalidArgument(f"path {brief(path)}: {exc.strerror or exc}") from None
        root = next((r for r in self.allowed_roots if real == r or real.startswith(r + os.sep)), None)
        if root is None:
            raise Unauthorized(
                f"{path} is not under a directory this daemon may read "
                f"(ingest.allowed_roots: {list(self.allowed_roots) or 'none'})"
            )
        loaded = await load_on_daemon(
            self.store, session, real, name, device=device or "cpu", root=root, threads=threads, logger=log
        )
        return {"version": loaded.sets[0][1], "nbytes": loaded.nbytes}, []
