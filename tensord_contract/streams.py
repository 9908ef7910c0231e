"""Typed messages of the stream ops, between daemons (`wire.PEER`): a puller pins a holder's
replica (`stream_open`), asks it for chunks (`stream_chunks`), and may have it join a pair group
to send them (`stream_pair`). Built and decoded as `tensord_contract.messages` are: requests
with `from_wire(raw, error)` on the holder (InvalidArgument), replies on the puller
(ProtocolError). Chunk indices are checked against the stream's chunk count, which the holder
knows from the pin (`StreamChunksRequest.from_wire`'s `count_of`) and the puller from its grid.

A chunk bitmap is one bit per chunk, `numpy.packbits` order (chunk 0 is the high bit of byte 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tensord_contract.checks import is_device_name, is_int
from tensord_contract.errors import ProtocolError, TensordError
from tensord_contract.message_checks import MAX_WAIT as MAX_WAIT  # the contract's, kept importable here
from tensord_contract.message_checks import MIN_CHUNK as MIN_CHUNK
from tensord_contract.message_checks import check_keys
from tensord_contract.names import check_name

#: pair group backends (`tensord.fleet.pairs`)
BACKENDS = ("nccl", "gloo")


def pack_bitmap(held: np.ndarray) -> bytes:
    return np.packbits(held.astype(bool)).tobytes()


def unpack_bitmap(data: object, count: int, error: type[TensordError] = ProtocolError) -> np.ndarray:
    """A bitmap of `count` chunks from its wire form; `error` if it is malformed."""
    if not isinstance(data, bytes) or len(data) != -(-count // 8):
        raise error(f"a chunk bitmap of {count} chunks must be {-(-count // 8)} bytes")
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count).astype(bool)


def chunk_list(value: object, count: int, what: str, error: type[TensordError]) -> list[int]:
    """A list of chunk indices from the wire; `error` if it is not one."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > count:
        raise error(f"{what} must be a list of at most {count} chunk indices")
    if not all(type(c) is int and 0 <= c < count for c in value):
        raise error(f"{what} must hold chunk indices from 0 to {count - 1}")
    return value


def _is_number(value: object, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


@dataclass(frozen=True)
class StreamOpenRequest:
    name: str
    version: int
    node: str  # the puller's node id
    chunk: int  # the chunk size it pulls in

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "node": self.node, "chunk": self.chunk}

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> StreamOpenRequest:
        check_keys(raw, "stream_open", ("name", "version", "node", "chunk"), (), error)
        name, version, node, chunk = raw["name"], raw["version"], raw["node"], raw["chunk"]
        check_name(name)
        if not is_int(version, 1):
            raise error("version must be a positive integer")
        if not isinstance(node, str) or not node or len(node) > 64:
            raise error("node must be the puller's node id")
        if not is_int(chunk, MIN_CHUNK) or chunk % 256:
            raise error(f"chunk must be at least {MIN_CHUNK} bytes, a multiple of 256")
        return cls(name, version, node, chunk)


@dataclass(frozen=True, eq=False)
class StreamOpenReply:
    """The holder's stream: complete (`have` None) or the chunks a pull of its own holds."""

    pin: int
    chunk: int
    count: int  # chunks in the grid
    have: np.ndarray | None  # bool per chunk; None: complete
    busy: int  # upload slots in use
    session: str  # the holder's Transfer Engine session ("": none)
    address: int  # the slab's address there
    nbytes: int  # the slab's size
    generation: int
    device: str  # where the slab lies

    @property
    def complete(self) -> bool:
        return self.have is None

    def to_wire(self) -> dict[str, Any]:
        return {
            "complete": self.have is None,
            "chunk": self.chunk,
            "count": self.count,
            "have": None if self.have is None else pack_bitmap(self.have),
            "busy": self.busy,
            "session": self.session,
            "address": self.address,
            "nbytes": self.nbytes,
            "generation": self.generation,
            "device": self.device,
            "pin": self.pin,
        }

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> StreamOpenReply:
        if not isinstance(raw, dict):
            raise error(f"malformed stream_open reply: {raw!r:.200}")
        ints = [raw.get(k) or 0 for k in ("pin", "chunk", "count", "busy", "address", "nbytes", "generation")]
        session, device = raw.get("session") or "", raw.get("device") or ""
        if not all(is_int(x, 0) for x in ints) or not isinstance(session, str) or not isinstance(device, str):
            raise error(f"malformed stream_open reply: {raw!r:.200}")
        pin, chunk, count, busy, address, nbytes, generation = ints
        have = raw.get("have")
        held = None if have is None or raw.get("complete") else unpack_bitmap(have, count, error)
        return cls(pin, chunk, count, held, busy, session, address, nbytes, generation, device)


@dataclass(frozen=True, eq=False)
class StreamChunksRequest:
    """Named `chunks` (`force`: those a complete holder must grant rather than redirect), or an
    open request (`want`, a bool per chunk: any of those, at most `limit`, starting the search
    at `start`); `done`: chunks read since the last request, `declined`: chunks granted and not
    read; `wait`: seconds to wait for a grant; `push` to `device`: send over a pair group. Only
    `pin` and nothing else: whether the holder still answers."""

    pin: int
    chunks: list[int] = field(default_factory=list)
    force: list[int] = field(default_factory=list)
    want: np.ndarray | None = None
    limit: int = 0
    start: int = 0
    done: list[int] = field(default_factory=list)
    declined: list[int] = field(default_factory=list)
    wait: float | None = None
    push: bool = False
    device: str = ""  # with push: where the puller's slab lies

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"pin": self.pin}
        if self.wait is not None:
            wire["wait"] = self.wait
        if self.done:
            wire["done"] = self.done
        if self.declined:
            wire["declined"] = self.declined
        if self.chunks:
            wire["chunks"] = self.chunks
            if self.force:
                wire["force"] = self.force
        if self.want is not None:
            wire.update(want=pack_bitmap(self.want), limit=self.limit, start=self.start)
        if self.push:
            wire.update(push=True, device=self.device)
        return wire

    @classmethod
    def from_wire(
        cls, raw: dict[str, Any], error: type[TensordError], count_of: Callable[[object], int]
    ) -> StreamChunksRequest:
        """`count_of(pin)`: the chunk count of the stream a pin names (raising for a pin that
        names none)."""
        optional = ("chunks", "force", "want", "limit", "start", "done", "declined", "wait", "push", "device")
        check_keys(raw, "stream_chunks", ("pin",), optional, error)
        pin = raw["pin"]
        count = count_of(pin)
        want, limit, start, wait = raw.get("want"), raw.get("limit"), raw.get("start"), raw.get("wait")
        push, device = raw.get("push"), raw.get("device")
        wanted = None
        if want is not None:
            wanted = unpack_bitmap(want, count, error) if isinstance(want, bytes) else None
            if wanted is None:
                raise error("want must be a chunk bitmap")
            if not is_int(limit, 1, count):
                raise error("limit must be a positive integer")
        if start is not None and not is_int(start, 0, count - 1):
            raise error("start must be a chunk index")
        if wait is not None and not _is_number(wait, 0, MAX_WAIT):
            raise error(f"wait must lie between 0 and {MAX_WAIT} seconds")
        if push is not None and not isinstance(push, bool):
            raise error("push must be true or false")
        if push and not is_device_name(device):
            raise error("a push needs device: where the puller's slab lies (cpu or cuda:N)")
        return cls(
            pin,
            chunk_list(raw.get("chunks"), count, "chunks", error),
            chunk_list(raw.get("force"), count, "force", error),
            wanted,
            limit or 0,
            start or 0,
            chunk_list(raw.get("done"), count, "done", error),
            chunk_list(raw.get("declined"), count, "declined", error),
            wait,
            bool(push),
            str(device) if push else "",
        )


@dataclass(frozen=True, eq=False)
class StreamChunksReply:
    """Chunks `granted` (read them at `address`, or receive them numbered `seq` over the pair
    group), `redirect` (chunk -> a node to ask instead), what a pulling holder has now (`have`),
    its `busy` slots; `gone`: the holder no longer has the version; `full`: no slot free."""

    granted: list[int] = field(default_factory=list)
    redirect: dict[int, str] = field(default_factory=dict)
    have: np.ndarray | None = None
    complete: bool = False
    busy: int = 0
    gone: bool = False
    full: bool = False
    address: int = 0
    seq: int | None = None  # -1: granted, but the holder has no pair group to send them over

    def to_wire(self) -> dict[str, Any]:
        return {
            "granted": self.granted,
            "redirect": [[c, n] for c, n in self.redirect.items()],
            "have": None if self.have is None else pack_bitmap(self.have),
            "complete": self.complete,
            "busy": self.busy,
            "gone": self.gone,
            "full": self.full,
            "address": self.address,
            "seq": self.seq,
        }

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError], count: int) -> StreamChunksReply:
        """The answer about a stream of `count` chunks; redirects outside it are dropped."""
        if not isinstance(raw, dict):
            raise error(f"a chunk request was answered with {type(raw).__name__}")
        granted = chunk_list(raw.get("granted"), count, "granted", error)
        redirect: dict[int, str] = {}
        for pair in raw.get("redirect") or []:
            if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) is not int or not isinstance(pair[1], str):
                raise error("malformed redirect")
            if 0 <= pair[0] < count:
                redirect[pair[0]] = pair[1]
        have, busy, address, seq = raw.get("have"), raw.get("busy") or 0, raw.get("address") or 0, raw.get("seq")
        if not is_int(busy, 0) or not is_int(address, 0) or not (seq is None or is_int(seq, -1)):
            raise error(f"malformed chunk answer: {raw!r:.200}")
        return cls(
            granted,
            redirect,
            None if have is None else unpack_bitmap(have, count, error),
            bool(raw.get("complete")),
            busy,
            bool(raw.get("gone")),
            bool(raw.get("full")),
            address,
            seq,
        )


@dataclass(frozen=True)
class StreamPairRequest:
    """Join the pair group `node` (the puller) set up at `host`:`port` under `key`, sending from
    the slab on `device` to the puller's on `to`."""

    node: str
    host: str
    port: int
    key: str
    backend: str  # one of BACKENDS
    device: str
    to: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "host": self.host,
            "port": self.port,
            "key": self.key,
            "backend": self.backend,
            "device": self.device,
            "to": self.to,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any], error: type[TensordError]) -> StreamPairRequest:
        keys = ("node", "host", "port", "key", "backend", "device", "to")
        check_keys(raw, "stream_pair", keys, (), error)
        node, host, port, key, backend, device, to = (raw[k] for k in keys)
        if not isinstance(node, str) or not isinstance(host, str) or not isinstance(key, str) or len(key) > 200:
            raise error("node, host and key must be strings")
        if not is_int(port, 1, 65535) or backend not in BACKENDS:
            raise error("port must be a TCP port and backend nccl or gloo")
        if not is_device_name(device) or not is_device_name(to):
            raise error("device and to must name devices (cpu or cuda:N)")
        return cls(node, host, port, key, backend, device, to)


@dataclass(frozen=True)
class StreamPairReply:
    seconds: float  # how long the holder took to join

    def to_wire(self) -> dict[str, Any]:
        return {"seconds": self.seconds}

    @classmethod
    def from_wire(cls, raw: object, error: type[TensordError]) -> StreamPairReply:
        seconds = raw.get("seconds") if isinstance(raw, dict) else None
        if not _is_number(seconds, 0, float("inf")):
            raise error(f"malformed stream_pair reply: {raw!r:.200}")
        return cls(float(seconds))  # type: ignore[arg-type]
