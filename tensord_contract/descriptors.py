"""Replica descriptors: what a daemon hands a client so that it can reach a slab's bytes.

One typed class per kind, both directions in one place: the daemon builds one and sends
``to_wire()``; the client decodes it with `replica_from_wire` (ProtocolError for anything
malformed) and opens an accessor (`sdk.dataplane.slab.open_slab`).

    host    a memfd on this node, passed alongside the reply (SCM_RIGHTS)
    cuda    a CUDA allocation on this node, exported by IPC handle
    remote  a slab on another node, read and written one-sided through its Transfer Engine

``generation`` is random per allocation: with the set name and version it names the bytes a
reader may have cached a manifest for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tensord_contract.errors import ProtocolError


def _u64(x: object) -> bool:
    return type(x) is int and 0 <= x < 2**64


@dataclass(frozen=True)
class HostReplica:
    nbytes: int
    generation: int
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


Replica = HostReplica | CudaReplica | RemoteReplica


def replica_from_wire(data: Any) -> Replica:
    """Decode a descriptor a daemon sent; ProtocolError if it is malformed."""
    if not isinstance(data, dict):
        raise ProtocolError("replica descriptor must be a map")
    kind, nbytes, generation = data.get("kind"), data.get("nbytes"), data.get("generation", 0)
    if not isinstance(nbytes, int) or not isinstance(generation, int) or not _u64(nbytes) or not _u64(generation):
        raise ProtocolError(f"replica descriptor has bad nbytes/generation: {data!r:.200}")
    if kind == "host":
        return HostReplica(nbytes, generation)
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
    raise ProtocolError(f"unknown replica kind {kind!r:.40}")
