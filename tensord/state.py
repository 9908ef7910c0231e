"""The daemon's state directory: what must outlive the daemon process.

It holds the embedded registry's version counters, so that a restarted single-node daemon never
hands out a version it handed out before, and the node's catalogue: every version it holds,
where it lies and where it came from, so that a restarted daemon restores what it held
(`tensord.restore`). Layout:

    <state_dir>/lock                  flock(2)-ed by the daemon that uses the directory
    <state_dir>/versions/<xx>.json    {"format": 1, "versions": {name: last version handed out}}
    <state_dir>/held/<h>-<v>.rec      one held version (msgpack): name, version, device, source,
                                      evicted, and, with the embedded registry, its manifest
                                      (its table apart, named by its digest:)
    <state_dir>/held/tables/<d>.tbl   one table of held versions' manifests (`held_tables`)

A name lives in the bucket file `xx` (two hex digits of a hash of the name), so handing out a
version rewrites one small file, not every counter; a held version is one file (`h`: a hash of
the name). Every write is durable before what it records is visible: a temporary file is
written and fsync-ed, renamed over the old one, and the directory fsync-ed; a removal fsyncs
the directory. Counters are never removed (a deleted name keeps its count); a held version's
file goes when the version is deleted or leaves the node for good. A damaged record is skipped
and logged (that version is not restored; the counters keep its number from being reused). A
counter file that cannot be read stops the daemon from starting, naming it: starting over would
reuse versions. State files are read without following links or waiting (a FIFO is refused), and a
record or table file larger than any the daemon writes (`MAX_STATE_FILE`) is refused unread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from tensord.durable import made_a_directory, not_a_directory, read_file, remove_file, unsettled, why, write_file
from tensord.held_tables import MAX_STATE_FILE, TableFiles
from tensord_contract.errors import InvalidArgument, OutOfCapacity, TensordError, Unavailable
from tensord_contract.manifest import Manifest
from tensord_contract.names import MAX_VERSION, check_name

log = logging.getLogger(__name__)

FORMAT = 1


class StateDir:
    """One daemon's state directory, locked for as long as it is open."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.versions = VersionCounters(self.path / "versions")
        self.catalogue = Catalogue(self.path / "held")
        self._lock_fd = -1

    def open(self) -> None:
        """Create (mode 0700) and lock the directory, then read what it holds."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgument(f"state directory {self.path}: {exc.strerror or exc}") from None
        lock = self.path / "lock"
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            raise InvalidArgument(
                f"state directory {self.path}: cannot open its lock file {lock}: {why(exc)}"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(f"state directory {self.path}: its lock file {lock} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InvalidArgument(f"state directory {self.path} is in use by another daemon") from None
        self._lock_fd = fd
        try:
            self.versions.load()
            self.catalogue.load()
            for directory in (self.versions.directory, self.catalogue.directory):
                _check_writable(directory)
        except BaseException:
            self.close()
            raise
        log.info(
            "state directory %s: version counters of %d names, %d held versions",
            self.path,
            len(self.versions),
            len(self.catalogue),
        )

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = -1


class VersionCounters:
    """The last version handed out per name, kept in bucket files under one directory."""

    BUCKETS = 256

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._buckets: dict[str, dict[str, int]] = {}
        self._lock: asyncio.Lock | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    @staticmethod
    def bucket(name: str) -> str:
        return hashlib.blake2b(name.encode(), digest_size=1).hexdigest()

    def load(self) -> None:
        kind = not_a_directory(self.directory)
        if kind:  # starting without its counters would reuse versions
            raise InvalidArgument(f"state directory {self.directory} is {kind}: make it the directory of counters")
        files = _files(self.directory, ".json")
        self._buckets.clear()
        for path in files:
            self._buckets[path.stem] = _read_bucket(path)

    def last(self, name: str) -> int:
        """The last version of `name` handed out (0: none yet)."""
        return self._buckets.get(self.bucket(name), {}).get(name, 0)

    async def at_least(self, name: str, version: int) -> None:
        """Make sure `version` counts as handed out (a held version the counters missed)."""
        if self.last(name) < version:
            log.warning("version counter of %s was behind a held version (v%d): moved up", name, version)
            await self.advance(name, to=version)

    async def advance(self, name: str, *, to: int | None = None) -> int:
        """Hand out the next version of `name` (or set the counter `to` a higher one), once it
        is on disk."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one write at a time: a later version never lands first
            key = self.bucket(name)
            counters = {**self._buckets.get(key, {})}
            counters[name] = version = counters.get(name, 0) + 1 if to is None else max(to, counters.get(name, 0))
            if version > MAX_VERSION:  # a version every reader can decode, or none
                raise OutOfCapacity(f"{name} has used every version up to {MAX_VERSION}: use another name", name=name)
            try:
                await asyncio.to_thread(_write_bucket, self.directory, key, counters)
            except OSError as exc:
                raise _failed(exc, f"cannot record version {version} of {name} in {self.directory}", name=name) from exc
            self._buckets[key] = counters
            return version


@dataclass(frozen=True)
class Record:
    """One version this node holds (or held and may bring back).

    `source`: how it came here: "peer" (pulled from another node), else the manifest's origin
    ("file:PATH" for a checkpoint, "put by ..." for a client's put). `evicted`: its slab was
    evicted under memory pressure and it is recoverable from its checkpoint (it comes back on
    its next read here). `manifest`: its manifest on the wire (`Manifest.to_wire()`), kept
    with the embedded registry only, whose state it is (with etcd, etcd keeps manifests).
    """

    name: str
    version: int
    device: str
    source: str
    evicted: bool = False
    manifest: dict[str, Any] | None = None
    table: str = ""  # the digest (hex) of the manifest's table, stored apart (`TableFiles`)

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.version


class Catalogue:
    """The versions this node holds, one durable file each under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records: dict[tuple[str, int], Record] = {}
        self.skipped: list[Path] = []  # damaged records left out at load
        self.tables = TableFiles(directory / "tables")
        self._lock: asyncio.Lock | None = None

    def __len__(self) -> int:
        return len(self.records)

    def get(self, name: str, version: int) -> Record | None:
        return self.records.get((name, version))

    @staticmethod
    def filename(name: str, version: int) -> str:
        return f"{hashlib.blake2b(name.encode(), digest_size=16).hexdigest()}-{version}.rec"

    def load(self) -> None:
        """Read every record; a damaged one is skipped and logged (its version is not restored,
        and the version counters keep it from being reused). A `held` that is not a directory
        (a link, a file) is not read: replaced by an empty directory (logged)."""
        kind = not_a_directory(self.directory)
        if kind:
            log.warning("%s is %s: the versions it records are not read; replaced by a directory", self.directory, kind)
            try:
                made_a_directory(self.directory)
            except OSError as exc:
                raise InvalidArgument(f"state directory {self.directory}: cannot be replaced: {why(exc)}") from None
        files = _files(self.directory, ".rec")
        try:
            self.tables.open()
        except OSError as exc:
            raise InvalidArgument(f"state directory {self.tables.directory}: cannot be replaced: {why(exc)}") from None
        self.records.clear()
        self.skipped = []
        self.tables.unsure = False
        read: dict[str, dict[str, Any] | None] = {}
        for path in files:
            try:
                record = _read_record(path)
                if record.manifest is not None and "table" in record.manifest:
                    key, manifest = record.manifest["table"], self.tables.joined(record.manifest, read)
                    if manifest is None:
                        raise InvalidArgument(f"state file {path}: its table file {key!r:.80} is missing or damaged")
                    record = dataclasses.replace(record, manifest=manifest, table=key)
            except InvalidArgument as exc:
                log.warning("skipped: %s", exc.message)
                self.skipped.append(path)
                self.tables.unsure = self.tables.unsure or unsettled(exc.__cause__)
                continue
            self.records[record.key] = record
        self.tables.keep_only({r.table for r in self.records.values() if r.table})

    async def put(self, record: Record) -> None:
        """Record (or replace) a held version, durably, before it is visible."""
        data = msgpack.packb(
            {
                "format": FORMAT,
                "name": record.name,
                "version": record.version,
                "device": record.device,
                "source": record.source,
                "evicted": record.evicted,
                "manifest": self.tables.placing(record.manifest, record.table)
                if record.table and record.manifest is not None
                else record.manifest,
            },
            use_bin_type=True,
        )
        async with self._locked():
            try:
                if record.table and record.manifest is not None:  # its table first: the record names it
                    await asyncio.to_thread(self.tables.write, record.table, record.manifest)
                await asyncio.to_thread(write_file, self.directory, self.filename(*record.key), data)
            except OSError as exc:
                raise _failed(
                    exc, f"cannot record {record.name} v{record.version} in {self.directory}", name=record.name
                ) from exc
            self.records[record.key] = record

    async def note(self, manifest: Manifest, device: str, source: str, *, evicted: bool, with_manifest: bool) -> None:
        """Record a version held (or evicted) here, unless it is recorded so already."""
        known = self.get(manifest.name, manifest.version)
        if known is not None and (known.device, known.source, known.evicted) == (device, source, evicted):
            return  # restored as it was recorded: nothing to write
        wire = manifest.to_wire() if with_manifest else None
        table = manifest.table.digest.hex() if with_manifest else ""
        await self.put(Record(manifest.name, manifest.version, device, source, evicted, wire, table))

    async def forget(self, name: str, version: int) -> None:
        """Drop a version that left this node for good (deleted, retired, or held elsewhere),
        durably; Unavailable if its file cannot be removed (then it stays recorded)."""
        async with self._locked():  # checked inside: a write queued before this one lands first
            if (name, version) not in self.records:
                return
            try:
                await asyncio.to_thread(remove_file, self.directory, self.filename(name, version))
            except OSError as exc:
                raise Unavailable(
                    f"cannot remove the record of {name} v{version} from {self.directory}: {exc.strerror or exc}",
                    name=name,
                    version=version,
                ) from exc
            gone = self.records.pop((name, version))
            if gone.table and not any(r.table == gone.table for r in self.records.values()):
                await asyncio.to_thread(self.tables.remove, gone.table)

    def _locked(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


def _files(directory: Path, suffix: str) -> list[Path]:
    """The files named *`suffix` in `directory` (made if missing), sorted."""
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        return sorted(p for p in directory.iterdir() if p.suffix == suffix)
    except OSError as exc:
        raise InvalidArgument(f"state directory {directory}: {exc.strerror or exc}") from None


def _check_writable(directory: Path) -> None:
    """Refuse a directory where records cannot be written and removed durably: a delete
    would not stay deleted (a read-only file system, an immutable directory)."""
    try:
        write_file(directory, ".writable", b"")
        remove_file(directory, ".writable")
    except OSError as exc:
        raise InvalidArgument(
            f"state directory {directory} cannot be written ({exc.strerror or exc}): deletes and new versions "
            "could not be recorded; make it writable or choose another (daemon.state_dir)"
        ) from None


def _read_record(path: Path) -> Record:
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(f"state file {path} {why}: repair or remove it (removing it forgets that held version)")

    try:
        data = msgpack.unpackb(read_file(path, MAX_STATE_FILE), raw=False, strict_map_key=True)
    except OSError as exc:
        raise bad(f"cannot be read ({why(exc)})") from exc
    except Exception:  # msgpack raises several unrelated types
        raise bad("is not valid msgpack") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"is not a held-version record of format {FORMAT}")
    name, version, device, source = data.get("name"), data.get("version"), data.get("device"), data.get("source")
    manifest, evicted = data.get("manifest"), data.get("evicted", False)
    try:
        name = check_name(name)
    except InvalidArgument:
        raise bad("holds a bad name") from None
    if type(version) is not int or not 1 <= version <= MAX_VERSION:
        raise bad("holds a bad version")
    if not isinstance(device, str) or not isinstance(source, str) or not isinstance(evicted, bool):
        raise bad("holds a bad device, source or evicted flag")
    if manifest is not None and not isinstance(manifest, dict):
        raise bad("holds a bad manifest")
    if path.name != Catalogue.filename(name, version):
        raise bad(f"does not belong to {name!r:.80} v{version}")
    return Record(name, version, device, source, evicted, manifest)


def _read_bucket(path: Path) -> dict[str, int]:
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(
            f"state file {path} {why}: repair or remove it (removing it lets the names it held reuse versions)"
        )

    try:
        data = json.loads(read_file(path, MAX_STATE_FILE))
    except OSError as exc:
        raise bad(f"cannot be read ({why(exc)})") from None
    except ValueError:
        raise bad("is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("versions"), dict):
        raise bad(f"is not a version-counter file of format {FORMAT}")
    counters = data["versions"]
    for name, version in counters.items():
        if type(version) is not int or not 0 <= version <= MAX_VERSION:
            raise bad(f"holds a bad counter for {name!r:.80}")
    return counters


def _write_bucket(directory: Path, key: str, counters: dict[str, int]) -> None:
    """Replace one bucket file durably."""
    data = json.dumps({"format": FORMAT, "versions": counters}, separators=(",", ":")).encode()
    write_file(directory, f"{key}.json", data)


#: write failures that mean this node ran out of something, not that the directory is broken
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM)


def _failed(exc: OSError, what: str, **details: Any) -> TensordError:
    """A state write's failure as the error a client sees: OutOfCapacity when descriptors,
    space or memory ran out (try again later), else Unavailable."""
    kind = OutOfCapacity if exc.errno in _EXHAUSTED else Unavailable
    return kind(f"{what}: {exc.strerror or exc}", **details)
