"""The daemon's state directory: what must outlive the daemon process.

Today it holds the embedded registry's version counters, so that a restarted single-node daemon
never hands out a version it handed out before. A later change keeps the node's catalogue here
too, to restore what it held after a restart. Layout:

    <state_dir>/lock                  flock(2)-ed by the daemon that uses the directory
    <state_dir>/versions/<xx>.json    {"format": 1, "versions": {name: last version handed out}}

A name lives in the bucket file `xx` (two hex digits of a hash of the name), so handing out a
version rewrites one small file, not every counter. Every write is durable before the version
is handed out: a temporary file is written and fsync-ed, renamed over the old one, and the
directory fsync-ed. Counters are never removed (a deleted name keeps its count). A file that
cannot be read stops the daemon from starting: silently starting over would reuse versions.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

from sdk.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

FORMAT = 1


class StateDir:
    """One daemon's state directory, locked for as long as it is open."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.versions = VersionCounters(self.path / "versions")
        self._lock_fd = -1

    def open(self) -> None:
        """Create (mode 0700) and lock the directory, then read what it holds."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise InvalidArgument(f"state directory {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InvalidArgument(f"state directory {self.path} is in use by another daemon") from None
        self._lock_fd = fd
        try:
            self.versions.load()
        except BaseException:
            self.close()
            raise
        log.info("state directory %s: version counters of %d names", self.path, len(self.versions))

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
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            files = sorted(p for p in self.directory.iterdir() if p.suffix == ".json")
        except OSError as exc:
            raise InvalidArgument(f"state directory {self.directory}: {exc.strerror or exc}") from None
        self._buckets.clear()
        for path in files:
            self._buckets[path.stem] = _read_bucket(path)

    def last(self, name: str) -> int:
        """The last version of `name` handed out (0: none yet)."""
        return self._buckets.get(self.bucket(name), {}).get(name, 0)

    async def advance(self, name: str) -> int:
        """Hand out the next version of `name`, once it is on disk."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one write at a time: a later version never lands first
            key = self.bucket(name)
            counters = {**self._buckets.get(key, {})}
            counters[name] = version = counters.get(name, 0) + 1
            try:
                await asyncio.to_thread(_write_bucket, self.directory, key, counters)
            except OSError as exc:
                raise Unavailable(
                    f"cannot record version {version} of {name} in {self.directory}: {exc.strerror or exc}",
                    name=name,
                ) from exc
            self._buckets[key] = counters
            return version


def _read_bucket(path: Path) -> dict[str, int]:
    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(
            f"state file {path} {why}: repair or remove it (removing it lets the names it held reuse versions)"
        )

    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise bad(f"cannot be read ({exc.strerror or exc})") from None
    except ValueError:
        raise bad("is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("versions"), dict):
        raise bad(f"is not a version-counter file of format {FORMAT}")
    counters = data["versions"]
    for name, version in counters.items():
        if type(version) is not int or version < 0:
            raise bad(f"holds a bad counter for {name!r:.80}")
    return counters


def _write_bucket(directory: Path, key: str, counters: dict[str, int]) -> None:
    """Replace one bucket file durably: temporary file, fsync, rename, fsync the directory."""
    final = directory / f"{key}.json"
    temporary = directory / f".{key}.json.tmp"
    data = json.dumps({"format": FORMAT, "versions": counters}, separators=(",", ":")).encode()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
