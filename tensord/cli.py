"""The `tensord` command: serve, load, ls, info, rm, status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from tensord_contract.errors import TensordError

log = logging.getLogger("tensord")


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

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="TOML config file (default: none; every key has a default)")
    s.add_argument("--node", help="node id (default: hostname)")
    s.set_defaults(run=_serve)

    s = sub.add_parser("load", help="load a .safetensors file or a Hugging Face directory")
    s.add_argument("path")
    s.add_argument("--name", required=True, help="set name, e.g. minilm or llama-8b/tp0")
    s.add_argument("--device", default="cpu", help="where the slab lives: cpu or cuda:N (default cpu)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("--tp", type=int, help="split for tensor parallelism: sets NAME/tp0 .. NAME/tp{N-1}")
    s.add_argument("--rules", help="sharding rules TOML file, or a built-in name (default with --tp: llama)")
    s.add_argument("--threads", type=int, help="reader threads (default: 16 for cuda; for cpu one per core, 2 to 8)")
    s.add_argument(
        "--on-daemon",
        action="store_true",
        help="let the daemon read the file itself (it must lie under ingest.allowed_roots)",
    )
    s.set_defaults(run=_load)

    s = sub.add_parser("export", help="write one version of a set to a .safetensors file")
    s.add_argument("name")
    s.add_argument("path")
    s.add_argument("--version", type=int, help="default: latest")
    s.set_defaults(run=_export)

    s = sub.add_parser("ls", help="list sets")
    s.add_argument("prefix", nargs="?", default="")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_ls)

    s = sub.add_parser("info", help="describe one version of a set")
    s.add_argument("name")
    s.add_argument("--version", type=int)
    s.add_argument("--tensors", action="store_true", help="list every tensor (dtype, shape, bytes)")
    s.add_argument("--json", action="store_true", help="everything as JSON, tensors included")
    s.set_defaults(run=_info)

    s = sub.add_parser("rm", help="delete a set, or one version of it")
    s.add_argument("name")
    s.add_argument("--version", type=int)
    s.set_defaults(run=_rm)

    s = sub.add_parser("replicate", help="make nodes pull a copy of a set (several at once: a streamed fan-out)")
    s.add_argument("name")
    s.add_argument("--version", type=int)
    s.add_argument(
        "--to",
        help="node that pulls, or nodes a,b,c, or 'all' live nodes (default: the daemon this command talks to)",
    )
    s.add_argument("--device", help="where the copy lives there (default: like the source, else cpu)")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(run=_replicate)

    s = sub.add_parser("nodes", help="live nodes with capacity and use")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_nodes)

    s = sub.add_parser("status", help="devices, budgets, use, sets, pins")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_status)
    return p


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


def _client(args: argparse.Namespace) -> Any:
    """A full client (data plane, imports torch): for load and export."""
    from sdk.client import Client

    return Client(args.socket, address=args.addr, token=args.token)


def _catalogue(args: argparse.Namespace) -> Any:
    """A client for the commands that move no tensor bytes: it imports no torch, so they start
    fast (benchmarks/cli_start.py)."""
    from sdk.catalogue import CatalogueClient

    return CatalogueClient(args.socket, address=args.addr, token=args.token)


def _load(args: argparse.Namespace) -> int:
    from tensord.ingest import load_checkpoint, load_sharded
    from tensord_contract.errors import InvalidArgument

    if args.rules is not None and args.tp is None:
        raise InvalidArgument("--rules needs --tp")
    if args.on_daemon and args.tp is not None:
        raise InvalidArgument("--on-daemon loads whole sets; use it without --tp")
    with _client(args) as client:
        t0 = time.perf_counter()
        if args.on_daemon:
            version = client.load_checkpoint(args.path, args.name, device=args.device, threads=args.threads)
            nbytes = client.info(args.name, version)["nbytes"]
            loaded = [(args.name, version)]
        elif args.tp is None:
            version, nbytes = load_checkpoint(
                client,
                args.path,
                args.name,
                device=args.device,
                threads=args.threads,
                progress=not args.quiet,
            )
            loaded = [(args.name, version)]
        else:
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
        dt = time.perf_counter() - t0
        if args.tp is not None:
            nbytes = sum(client.info(n, v)["nbytes"] for n, v in loaded)
    for name, version in loaded[:-1]:
        print(f"{name} v{version}")
    name, version = loaded[-1]
    print(f"{name} v{version}: {nbytes / 1e9:.3f} GB in {dt:.2f} s ({nbytes / 1e9 / dt:.2f} GB/s)")
    return 0


def _rules(spec: str | None) -> Any:
    """Sharding rules from a TOML file, or built-in rules by name (default: llama)."""
    from tensord.sharding import builtin_rules, load_rules

    if spec is None:
        return builtin_rules("llama")
    if os.path.exists(spec) or os.sep in spec or spec.endswith(".toml"):
        return load_rules(spec)
    return builtin_rules(spec)


def _export(args: argparse.Namespace) -> int:
    from tensord.ingest import export_set

    with _client(args) as client:
        t0 = time.perf_counter()
        version = export_set(client, args.name, args.path, version=args.version)
        dt = time.perf_counter() - t0
    size = os.path.getsize(args.path)
    print(f"{args.name} v{version} -> {args.path}: {size / 1e9:.3f} GB in {dt:.2f} s")
    return 0


def _ls(args: argparse.Namespace) -> int:
    with _catalogue(args) as client:
        sets = client.ls(args.prefix)
    if args.json:
        print(json.dumps(sets, indent=2))
        return 0
    rows = [
        (
            s["name"],
            str(s["latest"]),
            ",".join(map(str, s["versions"])),
            str(s["tensors"]),
            _human(s["nbytes"]),
            s["device"] or "-",
        )
        for s in sets
    ]
    _table(("NAME", "LATEST", "VERSIONS", "TENSORS", "BYTES", "DEVICE"), rows)
    return 0


def _info(args: argparse.Namespace) -> int:
    with _catalogue(args) as client:
        info = client.info(args.name, args.version, tensors=args.tensors or args.json)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']} v{info['version']} (latest v{info['latest']}; versions {info['versions']})")
    print(
        f"  {info['count']} tensors, {_human(info['nbytes'])} on {info['device'] or '-'}, "
        f"{info['pins']} pins, created {time.ctime(info['created'])}, origin {info['origin']}"
    )
    replicas = ", ".join(f"{r['node']}:{r['device']}" for r in info["replicas"]) or "none"
    print(f"  replicas: {replicas}")
    if info.get("lost"):
        print(f"  LOST in a restart: {info['lost']}")
    if info.get("evicted"):
        print("  evicted from this node: read again from its checkpoint on its next read")
    print("  dtypes: " + ", ".join(f"{d} x{n}" for d, n in info["dtypes"].items()))
    if not args.tensors:
        return 0
    _table(
        ("TENSOR", "DTYPE", "SHAPE", "BYTES"),
        [
            (k, t["dtype"], "x".join(map(str, t["shape"])) or "()", _human(t["nbytes"]))
            for k, t in info["tensors"].items()
        ],
    )
    return 0


def _rm(args: argparse.Namespace) -> int:
    with _catalogue(args) as client:
        n = client.delete(args.name, args.version)
    print(f"deleted {n} version{'s' * (n != 1)}")
    return 0


def _replicate(args: argparse.Namespace) -> int:
    many = args.to is not None and ("," in args.to or args.to == "all")
    to: str | list[str] | None = (
        [n.strip() for n in args.to.split(",") if n.strip()] if many and args.to != "all" else args.to
    )

    def progress(held: dict[str, float]) -> None:
        if held and not args.quiet:
            line = "  ".join(f"{n} {f:4.0%}" for n, f in sorted(held.items()))
            print(f"  {time.perf_counter() - t0:6.1f} s  {line}", file=sys.stderr, flush=True)

    with _catalogue(args) as client:
        t0 = time.perf_counter()
        r = client.replicate(args.name, args.version, to=to, device=args.device, progress=progress if many else None)
    dt = time.perf_counter() - t0
    if not many:
        print(f"{r['name']} v{r['version']} held on node {r['node']} ({r['device']}) in {dt:.2f} s")
        return 0
    for node, n in sorted(r["nodes"].items()):
        if n.get("held") and "device" not in n:
            print(f"{node}: held already")
            continue
        sources = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(n.get("sources", {}).items()))
        print(f"{node}: {n['device']} in {n.get('seconds', 0):.2f} s (from {sources or '-'})")
    print(f"{r['name']} v{r['version']} held on {len(r['nodes'])} nodes in {dt:.2f} s")
    return 0


def _nodes(args: argparse.Namespace) -> int:
    with _catalogue(args) as client:
        nodes = client.nodes()
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    rows = []
    for n in nodes:
        st = n.get("status") or {}
        for device, budget in sorted(n["devices"].items()):
            used = st.get("devices", {}).get(device, {}).get("used")
            rows.append(
                (
                    n["node"],
                    n["host"],
                    n["control"],
                    n["transport"] or "-",
                    device,
                    _human(budget),
                    "?" if used is None else _human(used),
                    str(st.get("sets", "?")),
                )
            )
    _table(("NODE", "HOST", "CONTROL", "TRANSPORT", "DEVICE", "BUDGET", "USED", "SETS"), rows)
    return 0


def _status(args: argparse.Namespace) -> int:
    with _catalogue(args) as client:
        st = client.status()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(
        f"node {st['node']} (tensord {st['version']}, up {st['uptime']:.0f} s): {st['sets']} sets, "
        f"{st['versions']} versions, {st['pins']} pins, {st['reservations']} open reservations; "
        f"host slabs in huge pages: {_human(st.get('huge_pages', 0))}"
    )
    restore = st.get("restore")
    if restore and restore["state"] != "none":
        pending = restore["pending"] + restore["running"]
        print(
            f"restore: {restore['state']}: {restore['restored']} of {restore['total']} held versions restored "
            f"({_human(restore['bytes'])} in {restore['seconds']:.1f} s), {restore['lost']} lost, {pending} pending"
        )
        for x in restore["lost_versions"]:
            print(f"  lost {x['name']} v{x['version']}: {x['reason']}")
    if st.get("evicted"):
        print(f"evicted ({st.get('eviction')}): {st['evicted']} versions, read again from their checkpoints when read")
    _table(  # IDLE: freed GPU allocations the daemon keeps for its next slabs
        ("DEVICE", "BUDGET", "USED", "FREE", "IDLE"),
        [
            (d, _human(v["budget"]), _human(v["used"]), _human(v["budget"] - v["used"]), _human(v.get("idle", 0)))
            for d, v in st["devices"].items()
        ],
    )
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
