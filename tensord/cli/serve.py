"""`tensord serve`: run the daemon."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

log = logging.getLogger("tensord")


def add_commands(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="TOML config file (default: none; every key has a default)")
    s.add_argument("--node", help="node id (default: hostname)")
    s.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from tensord import config as cfg
    from tensord.daemon import Daemon, raise_fd_limit

    config = cfg.load(args.config).with_overrides(socket=args.socket, node=args.node and cfg.check_node_id(args.node))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpc").setLevel(logging.WARNING)
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        log.warning("uvloop is not installed; using the default asyncio loop")
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)  # IPC-exported slabs need plain segments
    asyncio.run(Daemon(config).run())
    return 0
