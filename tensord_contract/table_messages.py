"""Typed messages of the ops that carry a tensor table, built and decoded as
`tensord_contract.messages`' are (that module's rules apply):

    PutBeginRequest / PutBeginReply   `put_begin`: reserve a slab for a new version (its layout
                                      and a descriptor to write it through)
    PublishRequest / PublishReply     `publish`: a process's own memory advertised as a version
    PutCommitRequest / PutCommitReply `put_commit`: the reserved slab, written, made a version
                                      (its fingerprints, one per tensor of the table)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tensord_contract.checks import is_int
from tensord_contract.descriptors import (
    PublishedIpcReplica,
    PublishedReplica,
    published_from_wire,
    published_ipc_from_wire,
)
from tensord_contract.errors import TensordError
from tensord_contract.manifest import FINGERPRINT_VERSIONS, Table, check_servable
from tensord_contract.manifest.table import DIGEST_BYTES
from tensord_contract.message_checks import check_keys, check_origin
from tensord_contract.names import check_name


def fp_definition(value: object, error: type[TensordError]) -> int:
    """The fingerprint definition a sender says its fingerprints were made with (`fp`); absent:
    2, what clients from before definition 3 made."""
    if value is None:
        return 2
    if not is_int(value) or value not in FINGERPRINT_VERSIONS:
        raise error(f"fp must name a fingerprint definition this daemon knows: {FINGERPRINT_VERSIONS}")
    return value


def _fingerprints(raw: object, count: int, error: type[TensordError]) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) != 8 * count:
        raise error(f"fingerprints must be bytes: one little-endian uint64 per tensor ({count})")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


@dataclass(frozen=True)
class PutBeginRequest:
    """`by_digest`: the table is named by its digest (`Table.digest`) instead of sent; the daemon
    takes its known table of the set (its newest version's) if the digest is that table's, else
    asks for the table (`PutBeginReply.wanting_table`). Decoded, `table` is then None."""

    name: str
    device: str  # where the slab is to lie: "cpu", "cuda:N"
    table: Table | None  # the tensors' names, dtypes and shapes; None: named by a digest not known
    origin: str | None = None  # where the bytes come from; None: the daemon says who put them
    by_digest: bool = False

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"name": self.name, "device": self.device}
        if self.table is None:
            raise ValueError("a put_begin request to send needs its table")
        if self.by_digest:
            wire["table_digest"] = self.table.digest
        else:
            wire["tensors"] = self.table.to_wire()
        if self.origin is not None:
            wire["origin"] = self.origin
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError], known: Table | None = None) -> PutBeginRequest:
        """Decoded (a large table takes a while: the daemon decodes it off its event loop)."""
        check_keys(raw, "put_begin", ("name", "device"), ("origin", "tensors", "table_digest"), error)
        name, device = raw["name"], raw["device"]
        if not isinstance(device, str):
            raise error("device must be a string like 'cpu' or 'cuda:0'")
        origin = check_origin(raw.get("origin"), error)
        check_name(name)
        if ("tensors" in raw) == ("table_digest" in raw):
            raise error("put_begin needs its table: the tensors, or the table's digest")
        if "tensors" in raw:
            return cls(name, device, Table.from_wire(raw["tensors"], error, known), origin)
        digest = raw["table_digest"]
        if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            raise error(f"table_digest must be the {DIGEST_BYTES}-byte digest of a table")
        table = known if known is not None and known.digest == digest else None
        return cls(name, device, table, origin, by_digest=True)


@dataclass(frozen=True, eq=False)
class PutBeginReply:
    reservation: int  # the reservation's id: put_commit or put_abort it on the same connection
    offsets: np.ndarray  # int64, each tensor's byte offset in the slab
    nbytes: int  # the layout's size
    replica: dict[str, Any]  # the slab's descriptor, to write it through

    def to_wire(self) -> dict[str, Any]:
        offsets = self.offsets.astype("<i8", copy=False).tobytes()
        return {"reservation": self.reservation, "offsets": offsets, "nbytes": self.nbytes, "replica": self.replica}

    @staticmethod
    def wanting_table() -> dict[str, Any]:
        """The reply to a request whose table digest the daemon does not know: send the table."""
        return {"table_wanted": True}

    @staticmethod
    def wants_table(raw: object) -> bool:
        return isinstance(raw, dict) and raw.get("table_wanted") is True

    @staticmethod
    def reservation_of(raw: object) -> int | None:
        """The reservation a reply made, even one that does not decode (to abort it)."""
        rid = raw.get("reservation") if isinstance(raw, dict) else None
        return rid if type(rid) is int else None

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError], count: int) -> PutBeginReply:
        """The reply to a put_begin of `count` tensors."""
        if not isinstance(raw, dict) or not isinstance(raw.get("offsets"), bytes):
            raise error(f"malformed put_begin reply: {raw!r:.200}")
        rid, offsets, nbytes, replica = raw.get("reservation"), raw["offsets"], raw.get("nbytes"), raw.get("replica")
        if type(rid) is not int or type(nbytes) is not int or nbytes < 0 or not isinstance(replica, dict):
            raise error(f"malformed put_begin reply: {raw!r:.200}")
        if len(offsets) != 8 * count:
            raise error("put_begin reply: one offset per tensor expected")
        return cls(rid, np.frombuffer(offsets, dtype="<i8").astype(np.int64), nbytes, replica)


def _publisher_form(replica: PublishedIpcReplica | PublishedReplica) -> dict[str, Any]:
    """A replica as a publisher describes it: the daemon sets its node, size and generation."""
    wire = replica.to_wire()
    for key in ("nbytes", "generation", "kind", "node"):
        wire.pop(key, None)
    return wire


@dataclass(frozen=True, eq=False)
class PublishRequest:
    """Tensors in the publisher's memory: GPU allocations exported by IPC (`ipc`, read on this
    node) and/or registered with its Transfer Engine (`exposed`, read from anywhere); at least
    one. Both describe the same allocations and each tensor's place in them."""

    name: str
    table: Table | None  # None (decoded only): named by a digest the daemon does not know
    fingerprints: np.ndarray  # uint64, one per tensor
    fp: int  # the fingerprint definition they were made with
    ipc: PublishedIpcReplica | None = None
    exposed: PublishedReplica | None = None  # its node is the daemon's to set ("" here)
    origin: str | None = None
    by_digest: bool = False  # the table named by its digest, as `PutBeginRequest`'s

    def to_wire(self) -> dict[str, Any]:
        if self.table is None:
            raise ValueError("a publish request to send needs its table")
        wire: dict[str, Any] = {
            "name": self.name,
            "fingerprints": self.fingerprints.astype("<u8", copy=False).tobytes(),
            "fp": self.fp,
        }
        if self.by_digest:
            wire["table_digest"] = self.table.digest
        else:
            wire["tensors"] = self.table.to_wire()
        if self.ipc is not None:
            wire["replica"] = _publisher_form(self.ipc)
        if self.exposed is not None:
            wire["exposed"] = _publisher_form(self.exposed)
        if self.origin is not None:
            wire["origin"] = self.origin
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError], known: Table | None = None) -> PublishRequest:
        """Decoded and checked: the descriptions fit the table's packed layout and agree, and
        the manifest with its places fits one reply frame. `known`: as for `Table.from_wire`."""
        optional = ("replica", "exposed", "origin", "fp", "tensors", "table_digest")
        check_keys(raw, "publish", ("name", "fingerprints"), optional, error)
        name, replica, exposed = raw["name"], raw.get("replica"), raw.get("exposed")
        check_name(name)
        origin = check_origin(raw.get("origin"), error)
        if replica is None and exposed is None:
            raise error("publish needs an IPC export (replica) or a Transfer Engine registration (exposed)")
        if not isinstance(replica, dict | None) or not isinstance(exposed, dict | None):
            raise error("replica and exposed must be maps describing the published allocations")
        if ("tensors" in raw) == ("table_digest" in raw):
            raise error("publish needs its table: the tensors, or the table's digest")
        if "tensors" in raw:
            table = Table.from_wire(raw["tensors"], error, known)
        else:
            digest = raw["table_digest"]
            if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
                raise error(f"table_digest must be the {DIGEST_BYTES}-byte digest of a table")
            if known is None or known.digest != digest:
                return cls(name, None, np.zeros(0, dtype=np.uint64), 0, None, None, origin, by_digest=True)
            table = known
        fingerprints = _fingerprints(raw["fingerprints"], len(table), error)
        fp = fp_definition(raw.get("fp"), error)
        _, nbytes = table.layout()
        ipc = None if replica is None else published_ipc_from_wire(replica, nbytes, 0, error)
        if ipc is not None:
            ipc.layout(table.sizes, error)
        reach = None if exposed is None else published_from_wire(exposed, "", nbytes, 0, error)
        if reach is not None:
            reach.layout(table.sizes, error)
            if ipc is not None and (reach.device, reach.sizes, reach.block, reach.offset) != (
                f"cuda:{ipc.device}",
                ipc.sizes,
                ipc.block,
                ipc.offset,
            ):
                raise error("replica and exposed must describe the same allocations")
        handles = sum(len(h) + 5 for h in ipc.handles) + 9 * len(ipc.sizes) if ipc is not None else 0
        handles += 17 * len(reach.sizes) if reach is not None else 0  # each allocation's address and size
        check_servable(len(table.names_blob), len(table), table.dims.size, error, extra=handles + 12 * len(table))
        return cls(name, table, fingerprints, fp, ipc, reach, origin, by_digest="table_digest" in raw)


@dataclass(frozen=True)
class PublishReply:
    version: int

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> PublishReply:
        version = raw.get("version") if isinstance(raw, dict) else None
        if type(version) is not int:
            raise error(f"malformed publish reply: {raw!r:.200}")
        return cls(version)


@dataclass(frozen=True)
class PutCommitRequest:
    reservation: int  # `PutBeginReply.reservation`, of this connection
    fingerprints: bytes  # one little-endian uint64 per tensor, the table's order
    fp: int = 2  # the fingerprint definition they were made with (absent: 2, older clients)

    @classmethod
    def of(cls, reservation: int, fingerprints: np.ndarray, fp: int) -> PutCommitRequest:
        return cls(reservation, np.ascontiguousarray(fingerprints, dtype="<u8").tobytes(), fp)

    def values(self) -> np.ndarray:
        """The fingerprints as uint64s."""
        return np.frombuffer(self.fingerprints, dtype="<u8").astype(np.uint64)

    def to_wire(self) -> dict[str, Any]:
        return {"reservation": self.reservation, "fingerprints": self.fingerprints, "fp": self.fp}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> PutCommitRequest:
        check_keys(raw, "put_commit", ("reservation", "fingerprints"), ("fp",), error)
        rid, fingerprints = raw["reservation"], raw["fingerprints"]
        if not is_int(rid):
            raise error(f"reservation must be the id put_begin answered, not {rid!r:.40}")
        if not isinstance(fingerprints, bytes) or len(fingerprints) % 8:
            raise error("fingerprints must be bytes: one little-endian uint64 per tensor")
        return cls(rid, fingerprints, fp_definition(raw.get("fp"), error))


@dataclass(frozen=True)
class PutCommitReply:
    version: int  # the version the put became

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> PutCommitReply:
        version = raw.get("version") if isinstance(raw, dict) else None
        if not is_int(version, 1):
            raise error(f"malformed put_commit reply: {raw!r:.200}")
        return cls(version)
