"""`open_slab`: the accessor for a decoded replica descriptor, one kind per module.

Kept apart from the interface (`slab`) so that the accessors import the interface and this
module imports the accessors: no module imports one that imports it back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensord_contract.descriptors import CudaReplica, HostReplica, PublishedIpcReplica, PublishedReplica, RemoteReplica
from tensord_contract.errors import ProtocolError
from tensord_contract.manifest import Manifest
from tensord_dataplane.slab import SlabAccess


def open_slab(
    replica: Any,
    fds: list[int],
    *,
    writable: bool = False,
    transport: Callable[[], Any] | None = None,
    manifest: Manifest | None = None,
) -> SlabAccess:
    """The accessor for a decoded replica descriptor (`tensord_contract.descriptors`); a
    publication (either kind) needs its version's `manifest`."""
    if isinstance(replica, RemoteReplica):
        if transport is None:
            raise ProtocolError("a remote replica needs a Transfer Engine")
        from tensord_dataplane.remote import RemoteAccess

        return RemoteAccess(replica, transport())
    if isinstance(replica, PublishedReplica):
        if transport is None or writable or manifest is None:
            raise ProtocolError("a published replica is read-only, through a Transfer Engine, with its manifest")
        from tensord_dataplane.published import PublishedAccess

        return PublishedAccess(replica, manifest, transport())
    if fds and not isinstance(replica, HostReplica):
        raise ProtocolError(f"a {replica.kind} replica comes without file descriptors")
    if isinstance(replica, HostReplica):
        if len(fds) != 1:
            raise ProtocolError(f"a host slab comes with one descriptor, got {len(fds)}")
        from tensord_dataplane.host import HostAccess

        return HostAccess(fds[0], replica.nbytes, replica.generation, writable=writable, pinned=replica.pinned)
    if isinstance(replica, CudaReplica):
        from tensord_dataplane.gpu import GpuAccess

        return GpuAccess.from_replica(replica, writable=writable)
    if isinstance(replica, PublishedIpcReplica):
        if writable or manifest is None:
            raise ProtocolError("a published replica is read-only and read with its manifest")
        from tensord_dataplane.published_ipc import PublishedIpcAccess

        return PublishedIpcAccess(replica, manifest)
    raise ProtocolError(f"unknown replica {replica!r:.80}")
