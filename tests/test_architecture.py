"""The import graph's rules, read from the source with ``ast`` (no module is imported).

The rooms: ``tensord_contract`` (the wire contract) stands alone; ``sdk`` (the client) and
``tensord`` (the daemon) both stand on it. The daemon never imports the client's face, only the
data plane both sides share; the one exception is the command line, ``tensord/cli/``, which is
a client of the daemon. Imports inside functions and ``TYPE_CHECKING`` blocks count too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: What the daemon may import from ``sdk``: the data plane it shares with the client.
SHARED_SDK = ("sdk.dataplane", "sdk.transport", "sdk.tensors")
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
    """(line, module) for every import of the client face: ``sdk`` beyond SHARED_SDK, including
    ``import sdk`` and ``from sdk import X`` (X not a shared module)."""
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
            if _within(name, "sdk") and not any(_within(name, shared) for shared in SHARED_SDK):
                yield node.lineno, name


def test_the_daemon_does_not_import_the_client_face() -> None:
    cli = ROOT / "tensord" / "cli"
    bad = [
        _where(path, line, module)
        for path in _modules("tensord")
        if cli not in path.parents
        for line, module in _client_face_imports(path)
    ]
    shared = ", ".join(SHARED_SDK)
    assert not bad, f"only tensord/cli/ may import the client (sdk beyond {shared}):\n" + "\n".join(bad)


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
        "from sdk.dataplane.slab import Slab\n"
        "from sdk import tensors, transport\n"
        "import sdk.transport.base\n"
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
    ]


@pytest.mark.parametrize("package", ["sdk", "tensord_contract"])
def test_the_client_and_the_contract_do_not_import_the_daemon(package: str) -> None:
    bad = [
        _where(path, line, module)
        for path in _modules(package)
        for line, module in _imports(path)
        if _within(module, "tensord")
    ]
    assert not bad, f"{package}/ must not import tensord (the daemon):\n" + "\n".join(bad)


def test_the_contract_stands_alone() -> None:
    bad = [
        _where(path, line, module)
        for path in _modules("tensord_contract")
        for line, module in _imports(path)
        if any(_within(module, other) for other in ("sdk", "tensord", "torch"))
    ]
    assert not bad, "tensord_contract/ imports neither sdk, tensord nor torch:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", ["tensord", "sdk", "tensord_contract"])
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
    assert wire.MUTATING <= wire.OPS
