"""Typed op messages: what an op's request and reply carry, both directions in one place.

Each class is built by the side that sends it and decoded with ``from_wire(raw, error)`` by the
side that receives it, `error` being the exception to raise for a malformed message
(InvalidArgument on the daemon: the client's fault; ProtocolError on the client: the daemon's).
Neither side spells the keys by hand.

    OpenRequest / OpenReply           `open`: pin a version and reach its replica (client ->
                                      daemon, and gateway -> holder between daemons)
    ReleaseRequest / ReleaseReply     `release`: give a pin back (any kind: read, mount, remote,
                                      stream)
    DeleteRequest / DeleteReply       `delete`: one version, or every version of a set
    UnpublishRequest / UnpublishReply `unpublish`: withdraw a publication, wait for its readers
    ReplicateRequest / ReplicateReply `replicate`: make nodes pull a copy; the reply is the
                                      single-node form's (`FanOutReply`: a fan-out's, a map of them)
    PutAbortRequest / PutAbortReply   `put_abort`: give a reservation back

The catalogue ops' messages (`ls`, `info`, `wait`, `load`) are in
`tensord_contract.catalogue_messages`, `hello`, `status` and `nodes` in
`tensord_contract.node_messages`. `put_commit`'s messages are in `tensord_contract.table_messages`
with `put_begin`'s (its fingerprint definitions come from the manifest, which needs numpy).

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
from tensord_contract.message_checks import MAX_FAN_OUT, MAX_HAVE, MAX_WAIT, MIN_CHUNK, check_keys, is_number
from tensord_contract.names import check_name, check_version

# No numpy here (nor in what this imports): the catalogue's client (`sdk.catalogue`, the
# `tensord` command) may use these messages and stays fast to start.


@dataclass(frozen=True)
class OpenRequest:
    name: str
    version: int | None = None  # None: latest, resolved by the daemon
    exclude: tuple[str, ...] = ()  # nodes whose replicas failed this reader
    have: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # cached manifests
    mount: bool = False  # the reader maps the version (counted as mapped bytes)
    table_refs: bool = False  # the reader takes a table from a manifest it has (`OpenReply.table_of`)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.exclude:
            wire["exclude"] = list(self.exclude)
        if self.have:
            wire["have"] = [list(pair) for pair in sorted(self.have)]
        if self.mount:
            wire["mount"] = True
        if self.table_refs:
            wire["table_refs"] = True
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> OpenRequest:
        check_keys(raw, "open", (), ("name", "version", "exclude", "have", "mount", "table_refs"), error)
        name, version = raw.get("name"), raw.get("version")
        exclude, have, mount = raw.get("exclude"), raw.get("have"), raw.get("mount")
        table_refs = raw.get("table_refs", False)
        if not isinstance(name, str):
            raise error("open needs a set name")
        check_name(name)
        version = check_version(version)
        if mount is not None and not isinstance(mount, bool):
            raise error("mount must be true or false: whether the client maps the version")
        if not isinstance(table_refs, bool):
            raise error("table_refs must be true or false: whether the client takes tables it has")
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
        return cls(name, version, tuple(exclude or ()), frozenset(pairs), bool(mount), table_refs)


@dataclass(frozen=True)
class OpenReply:
    pin: int
    version: int
    replica: dict[str, Any]  # a replica descriptor's wire form (`tensord_contract.descriptors`)
    manifest: dict[str, Any] | None = None  # None: the reader holds it (its `have`)
    # (version, generation) of a manifest in the reader's `have` whose table this one shares:
    # `manifest` then carries no table columns (`Manifest.placing_wire`)
    table_of: tuple[int, int] | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"pin": self.pin, "version": self.version, "manifest": self.manifest}
        wire["replica"] = self.replica
        if self.table_of is not None:
            wire["table_of"] = list(self.table_of)
        return wire

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> OpenReply:
        if not isinstance(raw, dict):
            raise error(f"malformed open reply: {raw!r:.200}")
        pin, version, replica, manifest = raw.get("pin"), raw.get("version"), raw.get("replica"), raw.get("manifest")
        if type(pin) is not int or type(version) is not int:
            raise error(f"malformed open reply: pin {pin!r:.40}, version {version!r:.40}")
        if not isinstance(replica, dict) or not (manifest is None or isinstance(manifest, dict)):
            raise error("malformed open reply: replica and manifest must be maps")
        table_of = raw.get("table_of")
        if table_of is not None:
            if not isinstance(table_of, list) or len(table_of) != 2 or not all(is_int(x) for x in table_of):
                raise error(f"malformed open reply: table_of {table_of!r:.40} is not a [version, generation] pair")
            if manifest is None:
                raise error("malformed open reply: table_of without a manifest")
            table_of = (table_of[0], table_of[1])
        return cls(pin, version, replica, manifest, table_of)


def _reply_map(raw: object, op: str, error: type[TensordError]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise error(f"malformed {op} reply: {raw!r:.200}")
    return raw


def _node_ids(value: object, what: str, error: type[TensordError]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise error(f"{what} must be a list of node ids")
    return tuple(value)


@dataclass(frozen=True)
class ReleaseRequest:
    #: the pin to give back; None where the request named none this connection could hold
    #: (not an int): the daemon answers released False, as for any pin it does not know
    pin: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"pin": self.pin}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> ReleaseRequest:
        check_keys(raw, "release", ("pin",), (), error)
        pin = raw["pin"]
        return cls(pin if is_int(pin) else None)


@dataclass(frozen=True)
class ReleaseReply:
    released: bool  # the pin was this connection's (now given back)
    intact: bool  # it held all along (a withdrawn publication or a lost remote pin: False)

    def to_wire(self) -> dict[str, Any]:
        return {"released": self.released, "intact": self.intact}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> ReleaseReply:
        raw = _reply_map(raw, "release", error)
        released, intact = raw.get("released"), raw.get("intact", True)  # daemons before `intact`
        if not isinstance(released, bool) or not isinstance(intact, bool):
            raise error(f"malformed release reply: released {released!r:.40}, intact {intact!r:.40}")
        return cls(released, intact)


@dataclass(frozen=True)
class DeleteRequest:
    name: str
    version: int | None = None  # None: every version of the set

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> DeleteRequest:
        check_keys(raw, "delete", ("name",), ("version",), error)
        name = raw["name"]
        if not isinstance(name, str):
            raise error("delete needs a set name")
        return cls(check_name(name), check_version(raw.get("version"), allow_latest=False))


@dataclass(frozen=True)
class DeleteReply:
    deleted: int  # how many versions went (0: none was there)

    def to_wire(self) -> dict[str, Any]:
        return {"deleted": self.deleted}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> DeleteReply:
        deleted = _reply_map(raw, "delete", error).get("deleted")
        if not is_int(deleted, 0):
            raise error(f"malformed delete reply: deleted {deleted!r:.40}")
        return cls(deleted)


@dataclass(frozen=True)
class UnpublishRequest:
    name: str
    version: int
    timeout: float | None = None  # how long to wait for readers' pins (None: the daemon's default)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.timeout is not None:
            wire["timeout"] = self.timeout
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> UnpublishRequest:
        check_keys(raw, "unpublish", ("name", "version"), ("timeout",), error)
        name, timeout = raw["name"], raw.get("timeout")
        if not isinstance(name, str):
            raise error("unpublish needs a set name")
        version = check_version(raw["version"], allow_latest=False)
        if version is None:
            raise error("unpublish needs the version that was published")
        if timeout is not None and not is_number(timeout, 0, MAX_WAIT):
            raise error(f"timeout must be seconds from 0 to {MAX_WAIT:g}")
        return cls(check_name(name), version, timeout)


@dataclass(frozen=True)
class UnpublishReply:
    drained: bool  # no reader pinned it any more when the reply was sent
    pins: int  # readers' pins left (revoked: their reads fail)

    def to_wire(self) -> dict[str, Any]:
        return {"drained": self.drained, "pins": self.pins}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> UnpublishReply:
        raw = _reply_map(raw, "unpublish", error)
        drained, pins = raw.get("drained"), raw.get("pins")
        if not isinstance(drained, bool) or not is_int(pins, 0):
            raise error(f"malformed unpublish reply: drained {drained!r:.40}, pins {pins!r:.40}")
        return cls(drained, pins)


@dataclass(frozen=True)
class ReplicateRequest:
    name: str
    version: int | None = None  # None: latest, resolved by the daemon
    device: str | None = None  # where the copy goes (None: like the replicas, else host memory)
    #: None: the daemon asked; a node id; several (a tuple: one fan-out); "all": every live node
    to: str | tuple[str, ...] | None = None
    rate: int | None = None  # bytes/s each pull may read (None: fleet.rate_limit; 0: no limit)
    chunk: int | None = None  # bytes per chunk (None: fleet.chunk_bytes)
    #: a fan-out's target: its place `index` of `of` among `peers` (set by the daemon that fans out)
    index: int | None = None
    of: int | None = None
    peers: tuple[str, ...] | None = None

    @property
    def fan_out(self) -> bool:
        return isinstance(self.to, tuple) or self.to == "all"

    @property
    def place(self) -> dict[str, Any]:
        """The fan-out place, as `Cluster.replicate` takes it ({} when this is no target of one)."""
        if self.index is None:
            return {}
        return {"index": self.index, "of": self.of, "peers": list(self.peers or ())}

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "version": self.version}
        for key in ("device", "rate", "chunk", "index", "of"):
            if getattr(self, key) is not None:
                wire[key] = getattr(self, key)
        if self.to is not None:
            wire["to"] = list(self.to) if isinstance(self.to, tuple) else self.to
        if self.peers is not None:
            wire["peers"] = list(self.peers)
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> ReplicateRequest:
        optional = ("version", "device", "to", "index", "of", "peers", "rate", "chunk")
        check_keys(raw, "replicate", ("name",), optional, error)
        name, device, to, rate, chunk = (raw.get(k) for k in ("name", "device", "to", "rate", "chunk"))
        index, of, peers = raw.get("index"), raw.get("of"), raw.get("peers")
        if not isinstance(name, str):
            raise error("replicate needs a set name")
        if device is not None and not isinstance(device, str):
            raise error("device must be a string like 'cpu' or 'cuda:0'")
        if rate is not None and not is_int(rate, 0):
            raise error("rate must be bytes per second (0: no limit)")
        if chunk is not None and (not is_int(chunk, MIN_CHUNK) or chunk % 256):
            raise error(f"chunk must be at least {MIN_CHUNK} bytes, a multiple of 256")
        if isinstance(to, list):
            to = _node_ids(to, "to", error)
        elif to is not None and not isinstance(to, str):
            raise error('to must be a node id, a list of node ids, or "all"')
        if index is not None or of is not None or peers is not None:
            if not (is_int(index) and is_int(of) and 0 <= index < of <= MAX_FAN_OUT):
                raise error(f"index and of must be integers with 0 <= index < of <= {MAX_FAN_OUT}")
            peers = () if peers is None else _node_ids(peers, "peers", error)
        return cls(check_name(name), check_version(raw.get("version")), device, to, rate, chunk, index, of, peers)


@dataclass(frozen=True)
class ReplicateReply:
    """A node's copy: where it is; a fan-out's target adds how its pull went."""

    node: str
    name: str
    version: int
    device: str
    seconds: float | None = None
    sources: dict[str, Any] | None = None  # bytes from each holder
    phases: dict[str, Any] | None = None  # seconds in each phase of the pull
    chunk: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"node": self.node, "name": self.name, "version": self.version, "device": self.device}
        for key in ("seconds", "sources", "phases", "chunk"):
            if getattr(self, key) is not None:
                wire[key] = getattr(self, key)
        return wire

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> ReplicateReply:
        raw = _reply_map(raw, "replicate", error)
        node, name, version, device = (raw.get(k) for k in ("node", "name", "version", "device"))
        seconds, sources, phases, chunk = (raw.get(k) for k in ("seconds", "sources", "phases", "chunk"))
        if not (isinstance(node, str) and isinstance(name, str) and is_int(version, 1) and isinstance(device, str)):
            raise error(f"malformed replicate reply: {raw!r:.200}")
        if not (seconds is None or is_number(seconds, 0, float("inf"))) or not (chunk is None or is_int(chunk, 1)):
            raise error(f"malformed replicate reply: seconds {seconds!r:.40}, chunk {chunk!r:.40}")
        if not all(m is None or isinstance(m, dict) for m in (sources, phases)):
            raise error("malformed replicate reply: sources and phases must be maps")
        return cls(node, name, version, device, seconds, sources, phases, chunk)


# -- put_abort --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PutAbortRequest:
    reservation: object  # `PutBeginReply.reservation`; the daemon refuses one not of this connection

    def to_wire(self) -> dict[str, Any]:
        return {"reservation": self.reservation}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> PutAbortRequest:
        check_keys(raw, "put_abort", ("reservation",), (), error)
        return cls(raw["reservation"])


@dataclass(frozen=True)
class PutAbortReply:
    def to_wire(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> PutAbortReply:
        _reply_map(raw, "put_abort", error)
        return cls()


# -- replicate's fan-out ------------------------------------------------------------------------
@dataclass(frozen=True)
class FanOutReply:
    """`replicate` to several nodes, when every one holds a checked replica (else TransferError)."""

    name: str
    version: int
    nodes: dict[str, ReplicateReply]  # the targets that pulled
    seconds: float
    held: tuple[str, ...] = ()  # the targets that held it already (on the wire: {node, held: true})

    def to_wire(self) -> dict[str, Any]:
        nodes: dict[str, Any] = {n: {"node": n, "held": True} for n in self.held}
        nodes.update({n: r.to_wire() for n, r in self.nodes.items()})
        return {"name": self.name, "version": self.version, "nodes": nodes, "seconds": self.seconds}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> FanOutReply:
        raw = _reply_map(raw, "replicate", error)
        name, version, nodes, seconds = (raw.get(k) for k in ("name", "version", "nodes", "seconds"))
        if not (
            isinstance(name, str)
            and is_int(version, 1)
            and isinstance(nodes, dict)
            and is_number(seconds, 0, float("inf"))
        ):
            raise error(f"malformed replicate reply: {raw!r:.200}")
        pulled: dict[str, ReplicateReply] = {}
        held: list[str] = []
        for node, entry in nodes.items():
            if isinstance(entry, dict) and entry.get("held") is True and entry.get("node") == node:
                held.append(node)
            else:
                pulled[node] = reply = ReplicateReply.from_wire(entry, error)
                if reply.node != node:
                    raise error(f"malformed replicate reply: {node!r:.40} answered for {reply.node!r:.40}")
        assert isinstance(seconds, int | float)
        return cls(name, version, pulled, seconds, tuple(held))
