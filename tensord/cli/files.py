"""Commands that move tensor bytes between files and the daemon: load and export.

``load`` hands a local daemon the opened files (``passing``, no torch in this process); over
TCP it reads them here into slabs the daemon reserves (``sdk.Client``)."""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

from tensord.cli.catalogue import version_arg

if TYPE_CHECKING:
    from sdk.client import Client
    from tensord.sharding import ShardRules


def add_commands(sub: Any) -> None:
    s = sub.add_parser("load", help="load a .safetensors file or a Hugging Face directory")
    s.add_argument("path")
    s.add_argument("--name", required=True, help="set name, e.g. minilm or llama-8b/tp0")
    s.add_argument("--device", default="cpu", help="where the slab lives: cpu or cuda:N (default cpu)")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.add_argument("--tp", type=int, help="split for tensor parallelism: sets NAME/tp0 .. NAME/tp{N-1}")
    s.add_argument("--rules", help="sharding rules TOML file, or a built-in name (default with --tp: llama)")
    s.add_argument("--threads", type=int, help="reader threads (default: 16 for cuda; for cpu one per core, 2 to 8)")
    s.add_argument(
        "--on-daemon",
        action="store_true",
        help="let the daemon open the file by path (it must lie under ingest.allowed_roots); "
        "by default a local daemon is handed the file opened here",
    )
    s.set_defaults(run=_load)

    s = sub.add_parser("export", help="write one version of a set to a .safetensors file")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--version", type=version_arg, help="a version number or latest (default)")
    s.set_defaults(run=_export)


def _client(args: argparse.Namespace) -> Client:
    """A full client (data plane, imports torch)."""
    from sdk.client import Client

    return Client(args.socket, address=args.addr, token=args.token)


def _load(args: argparse.Namespace) -> int:
    """Local daemon: pass the opened files (no torch here). Over TCP: read them in this process."""
    from sdk.catalogue import CatalogueClient
    from tensord_contract.errors import InvalidArgument

    if args.rules is not None and args.tp is None:
        raise InvalidArgument("--rules needs --tp")
    if args.on_daemon and args.tp is not None:
        raise InvalidArgument("--on-daemon loads whole sets; use it without --tp")
    with CatalogueClient(args.socket, address=args.addr, token=args.token, timeout=None) as catalogue:
        local = catalogue.endpoint.startswith("unix:")
        t0 = time.perf_counter()
        if args.on_daemon:
            version = catalogue.load_checkpoint(args.path, args.name, device=args.device, threads=args.threads)
            loaded, nbytes = [(args.name, version)], catalogue.info(args.name, version)["nbytes"]
        elif local:
            from tensord.cli.passing import load_passing

            reply = load_passing(
                catalogue,
                args.path,
                args.name,
                device=args.device,
                threads=args.threads,
                tp=args.tp,
                rules=args.rules,
                progress=not args.quiet,
            )
            loaded, nbytes = [(n, v) for n, v in reply["sets"]], reply["nbytes"]
    if not args.on_daemon and not local:
        t0 = time.perf_counter()
        loaded, nbytes = _load_here(args)
    dt = time.perf_counter() - t0
    for name, version in loaded[:-1]:
        print(f"{name} v{version}")
    name, version = loaded[-1]
    print(f"{name} v{version}: {nbytes / 1e9:.3f} GB in {dt:.2f} s ({nbytes / 1e9 / dt:.2f} GB/s)")
    return 0


def _load_here(args: argparse.Namespace) -> tuple[list[tuple[str, int]], int]:
    """Read the files in this process into slabs the daemon reserves (a daemon over TCP)."""
    from tensord.cli.checkpoints import load_checkpoint, load_sharded

    with _client(args) as client:
        if args.tp is None:
            version, nbytes = load_checkpoint(
                client, args.path, args.name, device=args.device, threads=args.threads, progress=not args.quiet
            )
            return [(args.name, version)], nbytes
        loaded = load_sharded(
            client,
            args.path,
            args.name,
            tp=args.tp,
            rules=_rules(args.rules),
            device=args.device,
            threads=args.threads,
            progress=not args.quiet,
        )
        return loaded, sum(client.info(n, v)["nbytes"] for n, v in loaded)


def _rules(spec: str | None) -> ShardRules:
    """Sharding rules from a TOML file, or built-in rules by name (default: llama)."""
    from tensord.sharding import builtin_rules, load_rules

    if spec is None:
        return builtin_rules("llama")
    if os.path.exists(spec) or os.sep in spec or spec.endswith(".toml"):
        return load_rules(spec)
    return builtin_rules(spec)


def _export(args: argparse.Namespace) -> int:
    from tensord.cli.checkpoints import export_set

    with _client(args) as client:
        t0 = time.perf_counter()
        version = export_set(client, args.name, args.path, version=args.version)
        dt = time.perf_counter() - t0
    size = os.path.getsize(args.path)
    print(f"{args.name} v{version} -> {args.path}: {size / 1e9:.3f} GB in {dt:.2f} s")
    return 0
