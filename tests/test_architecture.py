"""The import graph's rules, read from the source with ``ast`` (no module is imported).

Four layers: ``tensord_contract`` (the wire contract) stands alone; ``tensord_dataplane`` (bytes
between memories, transports) stands on the contract only; ``sdk`` (the client face) and
``tensord`` (the daemon) stand on both. The client never imports the daemon; the daemon never
imports the client face, except the command line, ``tensord/cli/``, which is a client of the
daemon. No module imports one that imports it back (no circles, within or across packages).
Imports inside functions and ``TYPE_CHECKING`` blocks count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tensord_contract", "tensord_dataplane", "sdk", "tensord")
MAX_LINES = 450


def _modules(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def _from_module(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of ``from ... import``, relative ones resolved against `path`."""
    if not node.level:
        assert node.module is not None
        return node.module
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join((*base, node.module) if node.module else base)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in a file; ``from a import b`` gives ``a`` and ``a.b``
    (b may be a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(path, node)
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(ROOT)}:{line} imports {module}"


def _client_face_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every import of the client face ``sdk``, in any form: ``import sdk``,
    ``from sdk import X``, ``from sdk.x import y``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and _from_module(path, node) == "sdk":
            names = [f"sdk.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [_from_module(path, node)]
        else:
            continue
        for name in names:
            if _within(name, "sdk"):
                yield node.lineno, name


def test_the_daemon_does_not_import_the_client_face() -> None:
    cli = ROOT / "tensord" / "cli"
    bad = [
        _where(path, line, module)
        for path in _modules("tensord")
        if cli not in path.parents
        for line, module in _client_face_imports(path)
    ]
    assert not bad, "only tensord/cli/ may import the client face (sdk):\n" + "\n".join(bad)


def test_the_rule_sees_every_form_of_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sdk\n"
        "import sdk.client\n"
        "from sdk import Client\n"
        "from sdk.catalogue import CatalogueClient\n"
        "from sdk.connection import Connection\n"
        "from sdk.engines.vllm import register\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from sdk import connection\n"
        "def f():\n"
        "    import sdk.engines\n"
        "from tensord_dataplane.slab import SlabAccess\n"
        "from sdk import tensors, transport\n"
        "import tensord_dataplane.transport.base\n"
        "from tensord_contract.errors import InvalidArgument\n"
    )
    assert sorted(_client_face_imports(probe)) == [
        (1, "sdk"),
        (2, "sdk.client"),
        (3, "sdk.Client"),
        (4, "sdk.catalogue"),
        (5, "sdk.connection"),
        (6, "sdk.engines.vllm"),
        (9, "sdk.connection"),
        (11, "sdk.engines"),
        (13, "sdk.tensors"),
        (13, "sdk.transport"),
    ]


#: What each package may not import (of ours, and torch for the contract).
FORBIDDEN = {
    "tensord_contract": ("tensord_dataplane", "sdk", "tensord", "torch"),
    "tensord_dataplane": ("sdk", "tensord"),
    "sdk": ("tensord",),
}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_layer_imports_only_the_layers_below(package: str) -> None:
    bad = [
        _where(path, line, module)
        for path in _modules(package)
        for line, module in _imports(path)
        if any(_within(module, other) for other in FORBIDDEN[package])
    ]
    assert not bad, f"{package}/ imports none of {FORBIDDEN[package]}:\n" + "\n".join(bad)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (``from a import b`` counts ``a.b`` where that is
    a module, else ``a``); a package's ``__init__`` re-exporting is not counted as a circle with
    the modules it re-exports."""
    paths = [path for package in PACKAGES for path in _modules(package)]
    modules = {_module_name(path) for path in paths}
    graph: dict[str, set[str]] = {}
    for path in paths:
        me = _module_name(path)
        targets = set()
        for _, module in _imports(path):
            while module and module not in modules:
                module = module.rpartition(".")[0]
            if module and module != me and not _within(me, module):
                targets.add(module)
        graph[me] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None (iterative depth-first search)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_no_import_circles() -> None:
    circle = _cycle(_import_graph())
    assert circle is None, "modules import each other in a circle: " + " -> ".join(circle or [])


def test_the_circle_check_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_the_size_limit(package: str) -> None:
    sizes = {path: len(path.read_text().splitlines()) for path in _modules(package)}
    big = [f"{path.relative_to(ROOT)}: {n} lines" for path, n in sizes.items() if n > MAX_LINES]
    assert not big, f"modules over {MAX_LINES} lines (split them):\n" + "\n".join(big)


def test_every_op_in_the_table_has_a_handler_and_no_handler_is_unlisted() -> None:
    """The op table (tensord_contract.wire.OPS) and the daemon's `op_<name>` methods agree: an op
    without a handler would only fail at request time, a handler outside the table is unreachable."""
    from tensord.ops.service import Service
    from tensord_contract import wire

    handlers = {name[3:] for name in dir(Service) if name.startswith("op_")}
    assert handlers == set(wire.OPS), (
        f"only in the table: {set(wire.OPS) - handlers}; only handled: {handlers - set(wire.OPS)}"
    )
    assert wire.MUTATING <= wire.OPS and wire.PEER <= wire.OPS


#: collaborators the daemon hands to whoever uses them: reaching one through the object that
#: holds it (``x.cluster.serving``, ``x.store.registry``) is a service locator. Only
#: ``tensord/daemon.py``, which builds and wires them, may.
HELD_BY = {
    "cluster": {"serving", "pairs", "peers", "store", "context", "registry"},
    "store": {"registry", "node", "metrics", "transport", "registrations", "versions"},
}
#: counters of another object's record, changed only by the module that owns the record
COUNTERS_OWNED = {"pins": {"tensord/versions.py", "tensord/fleet/serve.py"}}


def _reaches(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, (ast.Attribute, ast.Name)):
            holder = node.value.attr if isinstance(node.value, ast.Attribute) else node.value.id
            if node.attr in HELD_BY.get(holder, ()):
                yield node.lineno, f"{holder}.{node.attr}"


def test_the_daemon_hands_collaborators_in_rather_than_reaching_through_their_holders() -> None:
    found = []
    for path in _modules("tensord"):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(), filename=rel)
        if rel != "tensord/daemon.py":
            found += [f"{rel}:{line} reaches {what}" for line, what in _reaches(tree)]
        for node in ast.walk(tree):
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute):
                owners = COUNTERS_OWNED.get(node.target.attr)
                if owners is not None and rel not in owners:
                    found.append(f"{rel}:{node.lineno} changes another object's {node.target.attr}")
    assert not found, "\n".join(found)


def test_the_reach_check_finds_a_reach() -> None:
    tree = ast.parse("x = self.cluster.serving.status()\ny = self.serving.status()\nz = store.registry")
    assert sorted(_reaches(tree)) == [(1, "cluster.serving"), (3, "store.registry")]
