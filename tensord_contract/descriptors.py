"""Replica descriptors: what a daemon hands a client so that it can reach a slab's bytes.

One typed class per kind, both directions in one place: the daemon builds one and sends
``to_wire()``; the client decodes it with `replica_from_wire` (ProtocolError for anything
malformed) and opens an accessor (`tensord_dataplane.opening.open_slab`).

    host    a memfd on this node, passed alongside the reply (SCM_RIGHTS)
    cuda    a CUDA allocation on this node, exported by IPC handle
    remote  a slab on another node, read and written one-sided through its Transfer Engine
    owned   a publication of a client process's own GPU memory (no copy), read on its node
            (`PublishedIpcReplica`): many CUDA allocations (IPC handles) and, per tensor, the
            allocation and offset it lies at; the kind keeps its old wire name
    published  the same memory (GPU or host) registered with the publisher's own Transfer
            Engine (`PublishedReplica`): read one-sided from any node, this one included

``generation`` is random per allocation: with the set name and version it names the bytes a
reader may have cached a manifest for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeGuard

import numpy as np

from tensord_contract.checks import is_device_name
from tensord_contract.errors import ProtocolError, TensordError

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
MAX_BLOCKS = 1 << 20  # allocations one publication may span
MAX_ENGINES = 1024  # Transfer Engines one publication may be registered with


def _u64(x: object) -> bool:
    return type(x) is int and 0 <= x < 2**64


@dataclass(frozen=True)
class HostReplica:
    nbytes: int
    generation: int
    pinned: bool = False  # clients may page-lock it to copy to and from GPUs (the daemon's budget)
    kind: str = "host"

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CudaReplica:
    nbytes: int
    generation: int
    device: int
    ipc: tuple[Any, ...]  # torch's _share_cuda_() export of the allocation
    kind: str = "cuda"

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "ipc": list(self.ipc)}


@dataclass(frozen=True)
class RemoteReplica:
    node: str
    device: str  # where the bytes lie on their node
    session: str  # the holder's Transfer Engine
    address: int  # the slab's address in the holder's registered memory
    nbytes: int
    generation: int
    kind: str = "remote"

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PublishedIpcReplica:
    """Tensors in a publishing process's own CUDA allocations: `handles[b]` exports allocation
    b (`sizes[b]` bytes) by legacy CUDA IPC; row i of the manifest lies at byte `offset[i]` of
    allocation `block[i]` (little-endian uint32 and uint64 columns). Read-only, and only while
    the publisher keeps it published."""

    nbytes: int
    generation: int
    device: int
    handles: tuple[bytes, ...]
    sizes: tuple[int, ...]
    block: bytes
    offset: bytes
    kind: str = "owned"

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "handles": list(self.handles), "sizes": list(self.sizes)}

    def layout(self, sizes: np.ndarray, error: type[TensordError] = ProtocolError) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) per row for tensors of `sizes` bytes; `error` unless every tensor
        with bytes lies inside its allocation."""
        return _layout(self.block, self.offset, self.sizes, sizes, error)


def _layout(
    block_bytes: bytes, offset_bytes: bytes, blocks: tuple[int, ...], sizes: np.ndarray, error: type[TensordError]
) -> tuple[np.ndarray, np.ndarray]:
    n = len(sizes)
    if len(block_bytes) != 4 * n or len(offset_bytes) != 8 * n:
        raise error(f"a published replica needs one block and one offset per tensor ({n})")
    block = np.frombuffer(block_bytes, dtype="<u4").astype(np.int64)
    offset = np.frombuffer(offset_bytes, dtype="<u8")
    if n and offset.max() >= 2**62:
        raise error("a published replica's offsets must be below 2**62")
    offset = offset.astype(np.int64)
    used = np.flatnonzero(sizes > 0)
    if len(used):
        b = block[used]
        if b.max() >= len(blocks):
            raise error(f"a published replica names allocation {int(b.max())} of {len(blocks)}")
        ends = offset[used] + sizes[used]
        bad = np.flatnonzero(ends > np.asarray(blocks, dtype=np.int64)[b])
        if len(bad):
            raise error(f"tensor row {int(used[bad[0]])} runs past the end of its allocation")
    return block, offset


@dataclass(frozen=True)
class PublishedReplica:
    """A publishing process's memory (GPU or host) registered with its own Transfer Engine
    `session`: allocation b starts at `addresses[b]` there and spans `sizes[b]` bytes; row i of
    the manifest lies at byte `offset[i]` of allocation `block[i]` (columns as in
    `PublishedIpcReplica`). `node` is the daemon it was published to (the one that pins it).
    A publisher with more allocations than one engine advertises registers them with several:
    `more_sessions` are the others, and `session_of` (little-endian uint16 per allocation)
    indexes (session, *more_sessions); both empty for one engine."""

    node: str
    device: str
    session: str
    addresses: tuple[int, ...]
    sizes: tuple[int, ...]
    block: bytes
    offset: bytes
    nbytes: int
    generation: int
    kind: str = "published"
    more_sessions: tuple[str, ...] = ()
    session_of: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        wire = {**asdict(self), "addresses": list(self.addresses), "sizes": list(self.sizes)}
        if self.more_sessions:
            wire["more_sessions"] = list(self.more_sessions)
        else:  # one engine: the form peers without more_sessions know
            del wire["more_sessions"], wire["session_of"]
        return wire

    def sessions(self) -> tuple[tuple[str, ...], np.ndarray | None]:
        """Every engine's session and, with several, the index of each allocation's one."""
        sessions = (self.session, *self.more_sessions)
        return sessions, np.frombuffer(self.session_of, dtype="<u2") if self.session_of else None

    def layout(self, sizes: np.ndarray, error: type[TensordError] = ProtocolError) -> tuple[np.ndarray, np.ndarray]:
        """(block, offset) per row, checked as `PublishedIpcReplica.layout` does."""
        return _layout(self.block, self.offset, self.sizes, sizes, error)


def published_from_wire(
    data: dict[str, Any], node: str, nbytes: int, generation: int, error: type[TensordError]
) -> PublishedReplica:
    """The published replica a map describes (a publisher's, `node` set by the daemon, or a
    daemon's); `error` if malformed."""
    session, device, addresses, sizes = (data.get(k) for k in ("session", "device", "addresses", "sizes"))
    block, offset = data.get("block"), data.get("offset")
    more, session_of = data.get("more_sessions", []), data.get("session_of", b"")
    if not _session(session):
        raise error("a published replica needs its Transfer Engine session ('host:port')")
    if not isinstance(more, list) or len(more) > MAX_ENGINES - 1 or not all(_session(s) for s in more):
        raise error(f"a published replica's more_sessions must be a list of at most {MAX_ENGINES - 1} 'host:port'")
    if not is_device_name(device):
        raise error(f"a published replica's device must be 'cpu' or 'cuda:N', not {device!r:.40}")
    if not isinstance(addresses, list) or not isinstance(sizes, list) or len(addresses) != len(sizes):
        raise error("a published replica needs lists of allocation addresses and sizes of one length")
    if len(addresses) > MAX_BLOCKS:
        raise error(f"a published replica spans at most {MAX_BLOCKS} allocations")
    if not all(_u64(a) and a > 0 for a in addresses):
        raise error("every allocation address must be a positive 64-bit integer")
    if not all(type(s) is int and 0 < s < 2**48 for s in sizes):
        raise error("every allocation size must be an integer from 1 to 2**48")
    if not isinstance(block, bytes) or not isinstance(offset, bytes):
        raise error("a published replica needs its block and offset columns as bytes")
    if not isinstance(session_of, bytes) or ((more or session_of) and len(session_of) != 2 * len(addresses)):
        raise error("a published replica with more_sessions needs session_of: one uint16 per allocation")
    if session_of and int(np.frombuffer(session_of, dtype="<u2").max(initial=0)) > len(more):
        raise error(f"a published replica's session_of names a session past its {1 + len(more)}")
    return PublishedReplica(
        node,
        device,
        session,
        tuple(addresses),
        tuple(sizes),
        block,
        offset,
        nbytes,
        generation,
        "published",
        tuple(more),
        session_of,
    )


def _session(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= 255 and ":" in value


def published_ipc_from_wire(
    data: dict[str, Any], nbytes: int, generation: int, error: type[TensordError]
) -> PublishedIpcReplica:
    """The published IPC replica a map describes (from a publisher or a daemon); `error` if malformed."""
    handles, sizes, device = data.get("handles"), data.get("sizes"), data.get("device")
    block, offset = data.get("block"), data.get("offset")
    if type(device) is not int or not 0 <= device < 1024:
        raise error("a published IPC replica needs its CUDA device index")
    if not isinstance(handles, list) or not isinstance(sizes, list) or len(handles) != len(sizes):
        raise error("a published IPC replica needs lists of IPC handles and allocation sizes of one length")
    if len(handles) > MAX_BLOCKS:
        raise error(f"a published IPC replica spans at most {MAX_BLOCKS} allocations")
    if not all(isinstance(h, bytes) and len(h) == IPC_HANDLE_BYTES for h in handles):
        raise error(f"every IPC handle must be {IPC_HANDLE_BYTES} bytes")
    if not all(type(s) is int and 0 < s < 2**48 for s in sizes):
        raise error("every allocation size must be an integer from 1 to 2**48")
    if not isinstance(block, bytes) or not isinstance(offset, bytes):
        raise error("a published IPC replica needs its block and offset columns as bytes")
    return PublishedIpcReplica(nbytes, generation, device, tuple(handles), tuple(sizes), block, offset)


Replica = HostReplica | CudaReplica | RemoteReplica | PublishedIpcReplica | PublishedReplica


def replica_from_wire(data: Any) -> Replica:
    """Decode a descriptor a daemon sent; ProtocolError if it is malformed."""
    if not isinstance(data, dict):
        raise ProtocolError("replica descriptor must be a map")
    kind, nbytes, generation = data.get("kind"), data.get("nbytes"), data.get("generation", 0)
    if not isinstance(nbytes, int) or not isinstance(generation, int) or not _u64(nbytes) or not _u64(generation):
        raise ProtocolError(f"replica descriptor has bad nbytes/generation: {data!r:.200}")
    if kind == "host":
        pinned = data.get("pinned", False)
        if type(pinned) is not bool:
            raise ProtocolError(f"host replica descriptor: pinned must be a bool, not {pinned!r:.40}")
        return HostReplica(nbytes, generation, pinned)
    if kind == "cuda":
        ipc, device = data.get("ipc"), data.get("device")
        if not isinstance(ipc, list) or len(ipc) < 4 or type(device) is not int or device < 0:
            raise ProtocolError("cuda replica descriptor lacks its IPC export")
        return CudaReplica(nbytes, generation, device, tuple(ipc))
    if kind == "remote":
        node, device, session, address = (data.get(k) for k in ("node", "device", "session", "address"))
        if not all(isinstance(v, str) and v for v in (node, device, session)) or not _u64(address):
            raise ProtocolError(f"bad remote replica descriptor: {data!r:.200}")
        return RemoteReplica(node, device, session, address, nbytes, generation)  # type: ignore[arg-type]
    if kind == "owned":
        return published_ipc_from_wire(data, nbytes, generation, ProtocolError)
    if kind == "published":
        node = data.get("node")
        if not isinstance(node, str) or not node:
            raise ProtocolError("a published replica descriptor needs its node")
        return published_from_wire(data, node, nbytes, generation, ProtocolError)
    raise ProtocolError(f"unknown replica kind {kind!r:.40}")
