"""Typed op messages: what an op's request and reply carry, both directions in one place.

Each class is built by the side that sends it and decoded with ``from_wire(raw, error)`` by the
side that receives it, `error` being the exception to raise for a malformed message
(InvalidArgument on the daemon: the client's fault; ProtocolError on the client: the daemon's).
Neither side spells the keys by hand.

    OpenRequest / OpenReply           `open`: pin a version and reach its replica (client ->
                                      daemon, and gateway -> holder between daemons)

The messages that carry a tensor table (`put_begin`, `publish`) are in
`tensord_contract.table_messages`, the daemon-to-daemon stream ops (`stream_open`,
`stream_chunks`, `stream_pair`) in `tensord_contract.streams`: both need numpy, which this
module does not import. A request's decoder refuses unknown keys (`check_keys`); a reply's
ignores them (a newer daemon may say more).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensord_contract.checks import is_int
from tensord_contract.errors import TensordError
from tensord_contract.names import check_name, check_version

#: the most (version, generation) pairs a reader may say it holds manifests of
MAX_HAVE = 64
#: the longest an origin (where a version's bytes come from) may be
MAX_ORIGIN = 4096

# No numpy here (nor in what this imports): the catalogue's client (`sdk.catalogue`, the
# `tensord` command) may use these messages and stays fast to start.


def check_keys(
    raw: dict[str, Any], op: str, required: tuple[str, ...], optional: tuple[str, ...], error: type[TensordError]
) -> None:
    """A request carries every key it needs and none it does not know (`op` aside)."""
    unknown = sorted(k for k in raw if k != "op" and k not in required and k not in optional)
    if unknown:
        raise error(f"{op}: unknown arguments {unknown!r:.200}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise error(f"{op}: missing arguments {missing}")


def check_origin(origin: object, error: type[TensordError]) -> str | None:
    if origin is not None and (not isinstance(origin, str) or len(origin) > MAX_ORIGIN):
        raise error(f"origin must be a string of at most {MAX_ORIGIN} characters")
    return origin


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
        check_keys(raw, "open", (), ("name", "version", "exclude", "have", "mount"), error)
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
