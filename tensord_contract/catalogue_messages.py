"""Typed messages of the catalogue ops (`sdk.catalogue`): as `tensord_contract.messages`, built by
the sender (`to_wire()`) and decoded by the receiver (`from_wire(raw, error)`); a request
refuses unknown and missing keys, a reply ignores keys it does not know (a newer daemon may say
more).

    LsRequest / LsReply         `ls`: the sets under a prefix (`LsEntry` each)
    InfoRequest / InfoReply     `info`: one version (its replicas, partial replicas as
                                `PartialInfo`, the tensor table as rows or columns)
    WaitRequest / WaitReply     `wait`: a long poll for the next version of a set
    LoadRequest / LoadReply     `load`: a checkpoint the daemon reads (`PassedFile`: each
                                descriptor passed with the request)

`hello`, `status` and `nodes` (what a daemon says about itself) are in
`tensord_contract.node_messages`. No numpy here either: `tensord ls/info/load` start fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from tensord_contract.checks import is_int
from tensord_contract.errors import TensordError
from tensord_contract.message_checks import MAX_WAIT, check_keys, is_number
from tensord_contract.names import MAX_VERSION, check_name, check_prefix, check_version
from tensord_contract.reply_checks import (
    checked,
    is_bool,
    is_count,
    is_seconds,
    is_str,
    is_version,
    is_versions,
    malformed,
    optional,
    reply_list,
    reply_map,
)

#: the longest path each file passed with a `load` may carry
MAX_PATH = 4096
#: the most tensor-parallel ranks a `load` may split a checkpoint into
MAX_TP = 1024
#: how long a `wait` waits when the request does not say
DEFAULT_WAIT = 30.0


# -- ls ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LsRequest:
    prefix: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"prefix": self.prefix}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> LsRequest:
        check_keys(raw, "ls", (), ("prefix",), error)
        prefix = raw.get("prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise error("prefix must be a string")
        return cls(check_prefix(prefix or ""))


@dataclass(frozen=True)
class LsEntry:
    name: str
    latest: int
    versions: list[int]
    nbytes: int  # the latest version's tensor bytes
    tensors: int  # its tensor count
    origin: str | None  # where its bytes came from
    device: str | None  # where its replicas are ("node:device" in a cluster), None: nowhere

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_LS = {
    "name": is_str,
    "latest": is_version,
    "versions": is_versions,
    "nbytes": is_count,
    "tensors": is_count,
    "origin": optional(is_str),
    "device": optional(is_str),
}


@dataclass(frozen=True)
class LsReply:
    sets: tuple[LsEntry, ...]

    def to_wire(self) -> list[dict[str, Any]]:
        return [s.to_wire() for s in self.sets]

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> LsReply:
        return cls(
            tuple(checked(LsEntry, reply_map(s, "ls", error), "ls", _LS, error) for s in reply_list(raw, "ls", error))
        )


# -- info -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InfoRequest:
    name: str
    version: int | None = None  # None: latest
    tensors: bool | str = False  # True: rows; "columns": the manifest's columns (`TensorRows`)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.tensors:
            wire["tensors"] = self.tensors
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> InfoRequest:
        check_keys(raw, "info", ("name",), ("version", "tensors"), error)
        name, rows = raw["name"], raw.get("tensors")
        if rows is not None and not isinstance(rows, bool) and rows != "columns":
            raise error("tensors must be true, false or 'columns'")
        if not isinstance(name, str):
            raise error("info needs a set name")
        return cls(check_name(name), check_version(raw.get("version")), rows or False)


@dataclass(frozen=True)
class PartialInfo:
    """A partial replica (a pull under way): how many of its chunks a node holds."""

    node: str
    device: str
    held: int
    chunks: int
    chunk: int

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_PARTIAL = {"node": is_str, "device": is_str, "held": is_count, "chunks": is_count, "chunk": is_count}


@dataclass(frozen=True)
class InfoReply:
    name: str
    version: int
    latest: int
    versions: list[int]
    count: int  # tensors
    dtypes: dict[str, int]  # tensors per dtype
    nbytes: int  # tensor bytes
    slab_bytes: int  # with alignment
    created: float
    origin: str | None
    device: str | None  # where this node holds it, None: not here
    pins: int  # this node's pins on it
    published: bool  # in a publishing process's memory: no copy here
    mapped: int  # mounts of it by clients here (no copy either)
    lost: str | None  # why it was lost at this node's restart, None: it was not
    evicted: bool  # evicted here; comes back from its checkpoint on its next read
    replicas: list[dict[str, Any]]  # the registry's replica records
    partials: list[PartialInfo] = field(default_factory=list)
    tensors: Any = None  # rows (a list of maps) or columns (a map), as asked; None: not asked

    def to_wire(self) -> dict[str, Any]:
        wire = {f.name: getattr(self, f.name) for f in fields(self)}
        wire["partials"] = [p.to_wire() for p in self.partials]
        if self.tensors is None:
            del wire["tensors"]
        return wire

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> InfoReply:
        data = reply_map(raw, "info", error)
        partials = data.get("partials", [])
        partials = [
            checked(PartialInfo, reply_map(p, "info", error), "info", _PARTIAL, error)
            for p in reply_list(partials, "info", error)
        ]
        tensors = data.get("tensors")
        if tensors is not None and not isinstance(tensors, list | dict):
            raise malformed("info", "tensors", tensors, error)
        return checked(cls, {**data, "partials": partials, "tensors": tensors}, "info", _INFO, error)


_INFO = {
    "name": is_str,
    "version": is_version,
    "latest": is_version,
    "versions": is_versions,
    "count": is_count,
    "dtypes": lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_int(n, 0) for k, n in v.items()),
    "nbytes": is_count,
    "slab_bytes": is_count,
    "created": is_seconds,
    "origin": optional(is_str),
    "device": optional(is_str),
    "pins": is_count,
    "published": is_bool,
    "mapped": is_count,
    "lost": optional(is_str),
    "evicted": is_bool,
    "replicas": lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v),
    "partials": lambda v: True,  # checked above
    "tensors": lambda v: True,
}


# -- wait -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaitRequest:
    name: str
    after: int  # the version the caller has seen (0: none)
    timeout: float | None = None  # seconds (None: `DEFAULT_WAIT`)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "after": self.after}
        if self.timeout is not None:
            wire["timeout"] = self.timeout
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> WaitRequest:
        check_keys(raw, "wait", ("name", "after"), ("timeout",), error)
        name, after, timeout = raw["name"], raw["after"], raw.get("timeout")
        if not isinstance(name, str):
            raise error("wait needs a set name")
        check_name(name)
        if not is_int(after, 0, MAX_VERSION):
            raise error("after must be an integer from 0 to 2**63-1")
        if timeout is not None and not is_number(timeout, 0, MAX_WAIT):
            raise error(f"timeout must lie between 0 and {MAX_WAIT} seconds")
        return cls(name, after, timeout)


@dataclass(frozen=True)
class WaitReply:
    version: int | None  # the next version committed, None: none before the timeout

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> WaitReply:
        return checked(cls, reply_map(raw, "wait", error), "wait", {"version": optional(is_version)}, error)


# -- load -------------------------------------------------------------------------------------
def _path(value: object) -> bool:
    return isinstance(value, str) and bool(value) and "\0" not in value and len(value) <= MAX_PATH


@dataclass(frozen=True)
class PassedFile:
    """One descriptor passed with a `load`, as the caller opened it."""

    path: str
    size: int
    mtime_ns: int

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class LoadRequest:
    path: str  # the checkpoint (a file or a directory); read by the daemon unless `files`
    name: str
    device: str | None = None  # None: "cpu"
    threads: int | None = None  # None: the daemon's default for the device
    files: tuple[PassedFile, ...] | None = None  # the descriptors passed with the request
    tp: int | None = None  # split into NAME/tp0 .. NAME/tp{tp-1} (with `rules`)
    rules: dict[str, Any] | None = None  # sharding rules as parsed from TOML (the daemon checks them)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"path": self.path, "name": self.name}
        for key in ("device", "threads", "tp", "rules"):
            if getattr(self, key) is not None:
                wire[key] = getattr(self, key)
        if self.files is not None:
            wire["files"] = [f.to_wire() for f in self.files]
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> LoadRequest:
        check_keys(raw, "load", ("path", "name"), ("device", "threads", "files", "tp", "rules"), error)
        path, name, device, threads, files, tp, rules = (
            raw.get(k) for k in ("path", "name", "device", "threads", "files", "tp", "rules")
        )
        check_name(name)
        if not isinstance(path, str) or not path or "\0" in path:
            raise error("path must be a non-empty string without NUL characters")
        if device is not None and not isinstance(device, str):
            raise error("device must be a string like 'cpu' or 'cuda:0'")
        if threads is not None and not is_int(threads, 1, 64):
            raise error("threads must be an integer from 1 to 64")
        if tp is not None or rules is not None:
            if not is_int(tp, 1, MAX_TP):
                raise error(f"tp must be an integer from 1 to {MAX_TP} (with rules)")
            if not isinstance(rules, dict):
                raise error("rules must be a map: sharding rules as parsed from TOML")
        passed = None if files is None else _passed_files(files, error)
        assert isinstance(name, str)
        return cls(path, name, device, threads, passed, tp, rules)


def _passed_files(files: object, error: type[TensordError]) -> tuple[PassedFile, ...]:
    if not isinstance(files, list) or not files:
        raise error("files must describe each descriptor passed with the request")
    out = []
    for f in files:
        label, size, mtime = (f.get("path"), f.get("size"), f.get("mtime_ns")) if isinstance(f, dict) else (0, 0, 0)
        if not isinstance(label, str) or not _path(label):
            raise error("each file needs a path: a non-empty string without NUL characters")
        if not is_int(size, 0) or not is_int(mtime):
            raise error(f"file {label!r:.200}: size and mtime_ns must be integers")
        out.append(PassedFile(label, size, mtime))
    if len({f.path for f in out}) != len(out):
        raise error("the files' paths must be distinct")
    return tuple(out)


@dataclass(frozen=True)
class LoadReply:
    version: int  # of the first set
    nbytes: int
    sets: list[tuple[str, int]]  # every set made (one, or one per rank): name, version

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "nbytes": self.nbytes, "sets": [[n, v] for n, v in self.sets]}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> LoadReply:
        data = reply_map(raw, "load", error)
        version, nbytes, sets = data.get("version"), data.get("nbytes"), data.get("sets")
        if not is_int(version, 1, MAX_VERSION) or not is_int(nbytes, 0):
            raise error(f"malformed load reply: version {version!r:.40}, nbytes {nbytes!r:.40}")
        ok = isinstance(sets, list) and all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and is_version(s[1]) for s in sets
        )
        if not ok or not sets:
            raise error(f"malformed load reply: sets {sets!r:.100}")
        return cls(version, nbytes, [(n, v) for n, v in sets])
