"""The tables of held versions' manifests, one file each under `held/tables/`, named by the
table's digest (`Table.digest`): a new version of a layout already recorded (a training step,
a publication of the same memory) writes its places and fingerprints, not its table again
(8.6 MB at 90k tensors: ~30 ms of durable writing on the VM, on every put). A table file goes
with the last record that uses it; at load, one that fails its digest leaves its records
unrestored (logged), and files no record uses are removed (none where a record or table file
could not be read for a reason that may pass: permissions, I/O). A `tables` that is not a
directory (a symbolic link, a file) is never read or followed: its records are unrestored, and
it is replaced by an empty directory (logged), so new versions can be recorded.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import msgpack

from tensord.durable import (
    made_a_directory,
    not_a_directory,
    read_file,
    remove_file,
    unsettled,
    why,
    write_file,
)
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Table
from tensord_contract.manifest.version import TABLE_KEYS
from tensord_contract.wire import MAX_FRAME

log = logging.getLogger(__name__)

_KEY = re.compile(r"[0-9a-f]{64}")
#: a manifest fits one reply frame: no record or table file this daemon writes is larger
MAX_STATE_FILE = MAX_FRAME


class TableFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written: set[str] = set()  # keys whose file is on disk
        #: a record or table file could not be read at load for a reason that may pass: a
        #: record skipped meanwhile may use any table file, so none is removed
        self.unsure = False

    def open(self) -> None:
        """Before load: a `tables` that is not a real directory is replaced by an empty one
        (what it points to or holds is neither read nor removed); OSError if it cannot be."""
        kind = not_a_directory(self.directory)
        if kind:
            log.warning("%s is %s: the tables in it are not read; replaced by an empty directory", self.directory, kind)
            made_a_directory(self.directory)

    @staticmethod
    def placing(manifest: dict[str, Any], key: str) -> dict[str, Any]:
        """What a record stores of a manifest whose table lies in the file `key`."""
        return {**{k: v for k, v in manifest.items() if k not in TABLE_KEYS}, "table": key}

    def write(self, key: str, manifest: dict[str, Any]) -> None:
        """The table file of `manifest` (the whole wire form), durably, unless written already."""
        if key in self.written:
            return
        self.directory.mkdir(mode=0o700, exist_ok=True)
        part = {k: manifest[k] for k in TABLE_KEYS}
        write_file(self.directory, f"{key}.tbl", msgpack.packb(part, use_bin_type=True))
        self.written.add(key)

    def joined(self, manifest: dict[str, Any], read: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
        """A stored manifest with its table again, or None where the table file is missing or
        not the table its name says (`read`: tables read so far, by key)."""
        key = manifest.get("table")
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            return None
        if key not in read:
            read[key] = self._read(key)
        part = read[key]
        if part is None:
            return None
        return {**part, **{k: v for k, v in manifest.items() if k != "table"}}

    def _read(self, key: str) -> dict[str, Any] | None:
        path = self.directory / f"{key}.tbl"
        try:
            part = msgpack.unpackb(read_file(path, MAX_STATE_FILE), raw=False, strict_map_key=True)
            if not isinstance(part, dict) or set(part) != TABLE_KEYS:
                raise InvalidArgument("holds no table")
            if Table.from_wire(part, InvalidArgument).digest.hex() != key:
                raise InvalidArgument("is not the table its name says")
        except OSError as exc:
            log.warning("table file %s cannot be read (%s)", path, why(exc))
            self.unsure = self.unsure or unsettled(exc)
            return None
        except Exception as exc:  # msgpack raises several unrelated types
            log.warning("table file %s is damaged (%s)", path, getattr(exc, "message", exc))
            return None
        return part

    def keep_only(self, used: set[str]) -> None:
        """After load: the files records use are the ones written; others go, unless a file
        could not be read for a reason that may pass (permissions, I/O): then all stay."""
        self.written = set(used)
        if not self.directory.is_dir():
            return
        if self.unsure:
            log.warning("table files in %s kept: a state file could not be read now", self.directory)
            return
        for path in self.directory.iterdir():
            if path.suffix == ".tbl" and path.stem not in used:
                self.remove(path.stem)

    def remove(self, key: str) -> None:
        self.written.discard(key)
        try:
            remove_file(self.directory, f"{key}.tbl")
        except OSError as exc:  # a leftover file is removed at the next load
            log.warning("cannot remove table file %s: %s", self.directory / f"{key}.tbl", why(exc))
