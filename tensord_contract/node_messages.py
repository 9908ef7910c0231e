"""Typed messages of what a daemon says about itself: `hello` (the first request of every
connection), `status` and `nodes` (each live node's record and status). As
`tensord_contract.messages`; a reply ignores keys it does not know.

    HelloRequest / HelloReply
    StatusRequest / StatusReply   the top level typed; its parts (devices, restore, egress,
                                  pulls, pairs, registry, ...) are maps and lists whose shape
                                  `tensord status` and the tests read
    NodesRequest / NodesReply     `NodeEntry` each
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tensord_contract.checks import is_int
from tensord_contract.errors import TensordError
from tensord_contract.message_checks import check_keys
from tensord_contract.reply_checks import (
    checked,
    is_bool,
    is_count,
    is_map,
    is_maps,
    is_seconds,
    is_str,
    optional,
    reply_list,
    reply_map,
)


# -- hello ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HelloRequest:
    protocol: object  # the wire protocol the client speaks (the daemon refuses another one)
    client: str | None = None  # who is asking (shown in the daemon's log)
    token: str | None = None  # a TCP listener's token, for mutating ops (the server checks it)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"protocol": self.protocol}
        if self.client is not None:
            wire["client"] = self.client
        if self.token:
            wire["token"] = self.token
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> HelloRequest:
        check_keys(raw, "hello", ("protocol",), ("client", "token"), error)
        client, token = raw.get("client"), raw.get("token")  # a client that is no string: unnamed
        return cls(raw["protocol"], client if isinstance(client, str) else None, token if is_str(token) else None)


_HELLO = {"protocol": is_int, "node": is_str, "version": is_str, "transport": optional(is_map), "cluster": is_bool}


@dataclass(frozen=True)
class HelloReply:
    protocol: int
    node: str
    version: str  # the daemon's software version
    transport: dict[str, Any] | None  # its Transfer Engine (`Transport.describe`), None without one
    cluster: bool  # other nodes may read what is published here

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> HelloReply:
        data = {"cluster": False, **reply_map(raw, "hello", error)}  # daemons before `cluster`: none
        return checked(cls, data, "hello", _HELLO, error)


# -- status and nodes -------------------------------------------------------------------------
@dataclass(frozen=True)
class StatusRequest:
    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> StatusRequest:
        check_keys(raw, "status", (), (), error)
        return cls()


#: `status`'s top level: each key's check (its parts are free-form maps and lists)
_STATUS = {
    "node": is_str,
    "version": is_str,
    "uptime": is_seconds,
    "listen": is_str,
    "transport": optional(is_map),
    "devices": is_map,  # device -> budget, used, held, published, mapped, idle ...
    "huge_pages": is_count,
    "sets": is_count,
    "versions": is_count,
    "pins": is_count,
    "reservations": is_count,
    "eviction": is_str,
    "evicted": is_count,
    "published": is_maps,  # the publications held here
    "restore": optional(is_map),
    "egress": is_map,
    "pulls": is_maps,
    "pairs": optional(is_map),
    "registry": is_map,
    "loads": is_maps,  # name, done, total
}


@dataclass(frozen=True)
class StatusReply:
    node: str
    version: str
    uptime: float
    listen: str
    transport: dict[str, Any] | None
    devices: dict[str, Any]
    huge_pages: int
    sets: int
    versions: int
    pins: int
    reservations: int
    eviction: str
    evicted: int
    published: list[dict[str, Any]]
    restore: dict[str, Any] | None
    egress: dict[str, Any]
    pulls: list[dict[str, Any]]
    pairs: dict[str, Any] | None
    registry: dict[str, Any]
    loads: list[dict[str, Any]]

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> StatusReply:
        return checked(cls, reply_map(raw, "status", error), "status", _STATUS, error)


@dataclass(frozen=True)
class NodesRequest:
    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> NodesRequest:
        check_keys(raw, "nodes", (), (), error)
        return cls()


@dataclass(frozen=True)
class NodeEntry:
    """A live node's record in the registry, and its status (None where it did not answer)."""

    node: str
    host: str
    control: str  # "unix:/path" or "tcp:host:port"
    transport: str  # Transfer Engine session, "" when none
    devices: dict[str, int]  # device -> budget in bytes
    status: StatusReply | None

    def to_wire(self) -> dict[str, Any]:
        wire = {f.name: getattr(self, f.name) for f in fields(self)}
        wire["status"] = self.status.to_wire() if self.status is not None else None
        return wire


_NODE = {
    "node": is_str,
    "host": is_str,
    "control": is_str,
    "transport": is_str,
    "devices": lambda v: isinstance(v, dict) and all(isinstance(k, str) and is_int(n, 0) for k, n in v.items()),
    "status": lambda v: True,  # decoded below
}


@dataclass(frozen=True)
class NodesReply:
    nodes: tuple[NodeEntry, ...]

    def to_wire(self) -> list[dict[str, Any]]:
        return [n.to_wire() for n in self.nodes]

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> NodesReply:
        out = []
        for entry in reply_list(raw, "nodes", error):
            entry = reply_map(entry, "nodes", error)
            status = entry.get("status")
            status = None if status is None else StatusReply.from_wire(status, error)
            out.append(checked(NodeEntry, {**entry, "status": status}, "nodes", _NODE, error))
        return cls(tuple(out))
