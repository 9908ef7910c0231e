"""Typed op messages: what an op's request and reply carry, both directions in one place.

Each class is built by the side that sends it and decoded with ``from_wire(raw, error)`` by the
side that receives it, `error` being the exception to raise for a malformed message
(InvalidArgument on the daemon: the client's fault; ProtocolError on the client: the daemon's).
Neither side spells the keys by hand.

    OpenRequest / OpenReply   `open`: pin a version and reach its replica (client -> daemon,
                              and gateway -> holder between daemons)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensord_contract.checks import is_int
from tensord_contract.errors import TensordError
from tensord_contract.names import check_name, check_version

#: the most (version, generation) pairs a reader may say it holds manifests of
MAX_HAVE = 64


@dataclass(frozen=True)
class OpenRequest:
    name: str
    version: int | None = None  # None: latest, resolved by the daemon
    exclude: tuple[str, ...] = ()  # nodes whose replicas failed this reader
    have: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # cached manifests
    mount: bool = False  # the reader maps the version (counted as mapped bytes)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.exclude:
            wire["exclude"] = list(self.exclude)
        if self.have:
            wire["have"] = [list(pair) for pair in sorted(self.have)]
        if self.mount:
            wire["mount"] = True
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> OpenRequest:
        name, version = raw.get("name"), raw.get("version")
        exclude, have, mount = raw.get("exclude"), raw.get("have"), raw.get("mount")
        if not isinstance(name, str):
            raise error("open needs a set name")
        check_name(name)
        version = check_version(version)
        if mount is not None and not isinstance(mount, bool):
            raise error("mount must be true or false: whether the client maps the version")
        if exclude is not None and (not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude)):
            raise error("exclude must be a list of node ids")
        pairs: set[tuple[int, int]] = set()
        if have is not None:
            if not isinstance(have, list) or len(have) > MAX_HAVE:
                raise error(f"have must be a list of at most {MAX_HAVE} [version, generation] pairs")
            for pair in have:
                if not isinstance(pair, list) or len(pair) != 2 or not all(is_int(x) for x in pair):
                    raise error("have must hold [version, generation] pairs of ints")
                pairs.add((pair[0], pair[1]))
        return cls(name, version, tuple(exclude or ()), frozenset(pairs), bool(mount))


@dataclass(frozen=True)
class OpenReply:
    pin: int
    version: int
    replica: dict[str, Any]  # a replica descriptor's wire form (`tensord_contract.descriptors`)
    manifest: dict[str, Any] | None = None  # None: the reader holds it (its `have`)

    def to_wire(self) -> dict[str, Any]:
        return {"pin": self.pin, "version": self.version, "manifest": self.manifest, "replica": self.replica}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> OpenReply:
        if not isinstance(raw, dict):
            raise error(f"malformed open reply: {raw!r:.200}")
        pin, version, replica, manifest = raw.get("pin"), raw.get("version"), raw.get("replica"), raw.get("manifest")
        if type(pin) is not int or type(version) is not int:
            raise error(f"malformed open reply: pin {pin!r:.40}, version {version!r:.40}")
        if not isinstance(replica, dict) or not (manifest is None or isinstance(manifest, dict)):
            raise error("malformed open reply: replica and manifest must be maps")
        return cls(pin, version, replica, manifest)
