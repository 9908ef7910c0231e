"""`tensord load` by descriptor: this process opens the checkpoint's files (proving its user may
read them) and passes the descriptors to the daemon over the Unix socket (SCM_RIGHTS); the
daemon, whose CUDA is already up, reads them with its ingest pipeline. No torch here.

A daemon reached over TCP cannot take descriptors: ``files.py`` then loads in this process.
A single file costs no numpy either: headers are read by the daemon.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdk.catalogue import CatalogueClient
from tensord.regular_files import NotRegular, open_regular
from tensord_contract import wire
from tensord_contract.catalogue_messages import LoadRequest, PassedFile
from tensord_contract.errors import InvalidArgument, NotFound, TensordError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def checkpoint_files(path: str) -> list[str]:
    """The files a load of `path` reads: the file itself, or a directory's shard files (its
    index and headers checked here, as this user)."""
    if not os.path.isdir(path):
        return [path]
    from tensord.checkpoint import read_checkpoint  # numpy: only for a directory

    return list(dict.fromkeys(t.path for t in read_checkpoint(path)))


@contextlib.contextmanager
def opened_files(paths: list[str]) -> Iterator[list[tuple[int, dict[str, Any]]]]:
    """Each file opened read-only: (descriptor, {path, size, mtime_ns}); closed on exit."""
    out: list[tuple[int, dict[str, Any]]] = []
    try:
        for p in paths:
            try:  # a FIFO must not hang the open
                fd = open_regular(p)
            except FileNotFoundError:
                raise NotFound(f"{p}: no such file", path=p) from None
            except NotRegular:
                raise InvalidArgument(f"{p}: not a regular file", path=p) from None
            except OSError as exc:
                raise InvalidArgument(f"{p}: cannot read it: {exc.strerror or exc}", path=p) from None
            out.append((fd, {}))
            st = os.fstat(fd)
            out[-1] = (fd, {"path": os.path.abspath(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        yield out
    finally:
        for fd, _ in out:
            os.close(fd)


def rules_data(spec: str | None) -> dict[str, Any]:
    """Sharding rules as parsed TOML (checked here), from a file or built in by name (default llama)."""
    from tensord.sharding_rules import RULES_DIR, parse_rules  # no numpy

    path: str | Path = RULES_DIR / "llama.toml"
    if spec is not None:
        builtin = RULES_DIR / f"{spec}.toml"
        is_file = os.path.exists(spec) or os.sep in spec or spec.endswith(".toml")
        path = spec if is_file else builtin
        if not is_file and not builtin.is_file():
            raise NotFound(f"no built-in sharding rules {spec!r:.40}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise InvalidArgument(f"{path}: cannot read sharding rules: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: bad TOML: {exc}") from None
    parse_rules(data, source=str(path))
    return data


def load_passing(
    client: CatalogueClient,
    path: str,
    name: str,
    *,
    device: str,
    threads: int | None,
    tp: int | None,
    rules: str | None,
    progress: bool,
) -> dict[str, Any]:
    """Load `path` as `name` (or NAME/tp0.. with `tp`) by passing its files to the daemon; the
    daemon's reply: version, nbytes, sets."""
    paths = checkpoint_files(path)
    if len(paths) > wire.MAX_PASSED_FDS:
        raise InvalidArgument(f"{path}: {len(paths)} files, more than the {wire.MAX_PASSED_FDS} one load can pass")
    request = LoadRequest(os.path.abspath(path), name, device, threads)
    if tp is not None:
        request = dataclasses.replace(request, tp=tp, rules=rules_data(rules))
    with opened_files(paths) as files, _bar(client, name, progress):
        passed = tuple(PassedFile(**meta) for _, meta in files)
        return client.load_passed([fd for fd, _ in files], **dataclasses.replace(request, files=passed).to_wire())


@contextlib.contextmanager
def _bar(client: CatalogueClient, name: str, enabled: bool) -> Iterator[None]:
    """A progress bar on stderr, from the daemon's status, polled on a second connection."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    shown = threading.Event()

    def poll() -> None:
        started = time.perf_counter()
        with contextlib.suppress(TensordError, OSError), CatalogueClient(client.endpoint[5:]) as watcher:
            while not stop.wait(0.25):
                mine = [x for x in watcher.status().get("loads", []) if x["name"] == name]
                if mine:
                    done, total = mine[0]["done"], max(mine[0]["total"], 1)
                    rate = done / max(time.perf_counter() - started, 1e-9) / 1e9
                    bar = "#" * int(30 * min(done, total) / total)
                    sys.stderr.write(f"\r[{bar:<30}] {done / 1e9:7.2f}/{total / 1e9:.2f} GB {rate:6.2f} GB/s")
                    shown.set()

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        if shown.is_set():
            sys.stderr.write("\n")
