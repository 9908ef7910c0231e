"""Parse the command line and run one command: its exit status, errors as one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tensord.cli import catalogue, files, serve
from tensord_contract.errors import TensordError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, while it can still be handled
        return code
    except TensordError as exc:
        print(f"tensord: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`tensord info NAME --tensors | head`): stop quietly, with the
        # status a command killed by SIGPIPE has; nothing more goes to the closed pipe, not
        # even the interpreter's last flush.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tensord", description="GPU tensor-store daemon and its tools")
    p.add_argument("--socket", help="daemon socket (default: $TENSORD_SOCKET or /run/tensord/tensord.sock)")
    p.add_argument("--addr", help="a daemon's TCP listener host:port instead of a socket (default: $TENSORD_ADDR)")
    p.add_argument("--token", help="token for a TCP listener (default: $TENSORD_TOKEN)")
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    for commands in (serve, files, catalogue):
        commands.add_commands(sub)
    return p
