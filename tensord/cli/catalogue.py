"""Commands that move no tensor bytes: ls, info, rm, replicate, nodes, status.

They talk through ``sdk.catalogue.CatalogueClient``, which imports no torch, so they start fast
(benchmarks/cli_start.py); it is imported when a command runs, not when the parser is built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from tensord.cli.output import human, table
from tensord_contract.derivation import FILES, Derivation

if TYPE_CHECKING:
    from sdk.catalogue import CatalogueClient

T = TypeVar("T")


def version_arg(text: str) -> int | str:
    """A --version: a number, or "latest"."""
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a version number or 'latest', not {text!r:.40}") from None


def add_commands(sub: Any) -> None:
    s = sub.add_parser("ls", help="list sets")
    s.add_argument("prefix", nargs="?", default="")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=_ls)

    s = sub.add_parser("info", help="describe one version of a set")
    s.add_argument("name")
    s.add_argument("--version", type=version_arg, help="a version number or latest (default)")
    s.add_argument("--tensors", action="store_true", help="list every tensor (dtype, shape, bytes)")
    s.add_argument("--json", action="store_true", help="everything as JSON, tensors included")
    s.set_defaults(run=_info)

    s = sub.add_parser("rm", help="delete a set, or one version of it")
    s.add_argument("name")
    s.add_argument("--version", type=int, help="the version number to delete (default: every version)")
    s.set_defaults(run=_rm)

    s = sub.add_parser("replicate", help="make nodes pull a copy of a set (several at once: a streamed fan-out)")
    s.add_argument("name")
    s.add_argument("--version", type=version_arg, help="a version number or latest (default)")
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


def connect(args: argparse.Namespace) -> CatalogueClient:
    from sdk.catalogue import CatalogueClient

    return CatalogueClient(args.socket, address=args.addr, token=args.token)


def _show(args: argparse.Namespace, fetch: Callable[[CatalogueClient], T], render: Callable[[T], None]) -> int:
    """Fetch one value; print it as JSON if the command was given ``--json``, else `render` it."""
    with connect(args) as client:
        value = fetch(client)
    if getattr(args, "json", False):
        print(json.dumps(value, indent=2, default=_plain))
    else:
        render(value)
    return 0


def _ls(args: argparse.Namespace) -> int:
    return _show(args, lambda c: c.ls(args.prefix), _print_sets)


def _print_sets(sets: list[dict[str, Any]]) -> None:
    rows = [
        (
            s["name"],
            str(s["latest"]),
            ",".join(map(str, s["versions"])),
            str(s["tensors"]),
            human(s["nbytes"]),
            s["device"] or "-",
            _derived_from(s.get("origin")),
        )
        for s in sets
    ]
    table(("NAME", "LATEST", "VERSIONS", "TENSORS", "BYTES", "DEVICE", "FROM"), rows)


def _derived_from(origin: object) -> str:
    """What a derived set (an engine's rank set) was made from, as "SOURCE vN (ENGINE tpR/S)";
    "-" for any other set."""
    d = Derivation.from_origin(origin)
    if d is None:
        return "-"
    where = d.source if d.source.startswith(FILES) else f"{d.source} v{d.version}"
    return where if d.key is None else f"{where} ({d.key.engine} tp{d.key.tp_rank}/{d.key.tp_size})"


def _info(args: argparse.Namespace) -> int:
    def render(info: dict[str, Any]) -> None:
        _print_info(info, tensors=args.tensors)

    return _show(args, lambda c: c.info(args.name, args.version, tensors=args.tensors or args.json), render)


def _print_info(info: dict[str, Any], *, tensors: bool) -> None:
    print(f"{info['name']} v{info['version']} (latest v{info['latest']}; versions {info['versions']})")
    print(
        f"  {info['count']} tensors, {human(info['nbytes'])} on {info['device'] or '-'}, "
        f"{info['pins']} pins, created {time.ctime(info['created'])}, origin {info['origin']}"
    )
    replicas = ", ".join(f"{r['node']}:{r['device']}" for r in info["replicas"]) or "none"
    print(f"  replicas: {replicas}")
    if info.get("lost"):
        print(f"  LOST in a restart: {info['lost']}")
    if info.get("evicted"):
        print("  evicted from this node: read again from its checkpoint on its next read")
    print("  dtypes: " + ", ".join(f"{d} x{n}" for d, n in info["dtypes"].items()))
    if not tensors:
        return
    table(
        ("TENSOR", "DTYPE", "SHAPE", "BYTES"),
        [
            (k, t["dtype"], "x".join(map(str, t["shape"])) or "()", human(t["nbytes"]))
            for k, t in info["tensors"].items()
        ],
    )


def _rm(args: argparse.Namespace) -> int:
    def render(n: int) -> None:
        print(f"deleted {n} version{'s' * (n != 1)}")

    return _show(args, lambda c: c.delete(args.name, args.version), render)


def _replicate(args: argparse.Namespace) -> int:
    many = args.to is not None and ("," in args.to or args.to == "all")
    to: str | list[str] | None = (
        [n.strip() for n in args.to.split(",") if n.strip()] if many and args.to != "all" else args.to
    )

    def progress(held: dict[str, float]) -> None:
        if held and not args.quiet:
            line = "  ".join(f"{n} {f:4.0%}" for n, f in sorted(held.items()))
            print(f"  {time.perf_counter() - t0:6.1f} s  {line}", file=sys.stderr, flush=True)

    with connect(args) as client:
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
    return _show(args, lambda c: c.nodes(), _print_nodes)


def _print_nodes(nodes: list[dict[str, Any]]) -> None:
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
                    human(budget),
                    "?" if used is None else human(used),
                    str(st.get("sets", "?")),
                )
            )
    table(("NODE", "HOST", "CONTROL", "TRANSPORT", "DEVICE", "BUDGET", "USED", "SETS"), rows)


def _status(args: argparse.Namespace) -> int:
    return _show(args, lambda c: c.status(), _print_status)


def registry_line(registry: dict[str, Any]) -> str:
    """``status()["registry"]`` in one line: its kind, endpoint and lease (if it has them)."""
    line = f"registry: {registry['kind']}"
    if registry.get("endpoint"):
        line += f" {registry['endpoint']}"
    if registry.get("lease") is not None:
        line += f", lease {registry['lease']} (ttl {registry['ttl']:g} s, lost {registry['lost_count']} times)"
    return line


def _memory(device: dict[str, int]) -> tuple[str, ...]:
    return tuple(human(device.get(k, 0)) for k in ("idle", "held", "published", "mapped"))


def _print_status(st: dict[str, Any]) -> None:
    print(
        f"node {st['node']} (tensord {st['version']}, up {st['uptime']:.0f} s): {st['sets']} sets, "
        f"{st['versions']} versions, {st['pins']} pins, {st['reservations']} open reservations; "
        f"host slabs in huge pages: {human(st.get('huge_pages', 0))}"
    )
    if st.get("registry"):
        print(registry_line(st["registry"]))
    restore = st.get("restore")
    if restore and restore["state"] != "none":
        pending = restore["pending"] + restore["running"]
        print(
            f"restore: {restore['state']}: {restore['restored']} of {restore['total']} held versions restored "
            f"({human(restore['bytes'])} in {restore['seconds']:.1f} s), {restore['lost']} lost, {pending} pending"
        )
        for x in restore["lost_versions"]:
            print(f"  lost {x['name']} v{x['version']}: {x['reason']}")
    if st.get("evicted"):
        print(f"evicted ({st.get('eviction')}): {st['evicted']} versions, read again from their checkpoints when read")
    for p in st.get("published", []):  # in a client's own GPU memory: outside the budgets below
        where = f"{p['name']} v{p['version']} on {p['device']}"
        print(f"published {where}: {human(p['bytes'])}, {p['pins']} pins, by {p['owner']}")
    table(  # IDLE: freed GPU allocations kept for the next slabs; PUBLISHED, MAPPED: no copies (accounting.py)
        ("DEVICE", "BUDGET", "USED", "FREE", "IDLE", "HELD", "PUBLISHED", "MAPPED"),
        [
            (d, *(human(x) for x in (v["budget"], v["used"], v["budget"] - v["used"])), *_memory(v))
            for d, v in st["devices"].items()
        ],
    )


def _plain(value: object) -> object:
    """JSON for what json cannot write by itself: a mapping (an info's tensor rows)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
