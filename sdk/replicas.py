"""The data-plane base of `sdk.Client`: open a version (pin it, get its manifest, map its slab),
give pins back, and start this process's Transfer Engine for slabs on other nodes.

Manifests are cached by (name, version, replica generation): reopening a version this client
has seen transfers none. Reads (`sdk.reads`) and writes (`sdk.writes`) build on this.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
from dataclasses import dataclass

from sdk.catalogue import CatalogueClient
from sdk.connection import Connection
from tensord_contract.descriptors import replica_from_wire
from tensord_contract.errors import ProtocolError, TensordError, Unavailable
from tensord_contract.manifest import Manifest
from tensord_contract.messages import OpenReply, OpenRequest, ReleaseReply, ReleaseRequest
from tensord_contract.names import check_name, check_version
from tensord_dataplane.opening import open_slab
from tensord_dataplane.slab import SlabAccess
from tensord_dataplane.transport.base import Transport

_CACHED_MANIFESTS = 32  # manifests a client keeps, by (name, version, replica generation)


@dataclass(frozen=True)
class Pin:
    """A pin and the connection that holds it: it can only be given back on that connection
    (pin ids restart with the daemon, so another connection's pin may bear the same id)."""

    conn: Connection
    id: int
    name: str
    version: int


class ReplicaClient(CatalogueClient):
    """`CatalogueClient` plus pins, manifests and the Transfer Engine; see `sdk.Client`."""

    # Its state starts empty, so it keeps CatalogueClient's constructor (and its signature).
    _engine: Transport | None = None  # started by this client, closed with it
    _given: Transport | None = None  # handed to this client (`Client(transport=...)`): its caller's

    @functools.cached_property
    def _manifests(self) -> collections.OrderedDict[tuple[str, int, int], Manifest]:
        """The manifest cache, made on first use (always under self._lock)."""
        return collections.OrderedDict()

    # -- the Transfer Engine ------------------------------------------------------------------
    def _transport(self) -> Transport:
        """This process's Transfer Engine: the one this client was handed, else one started on
        first use (reads from other nodes)."""
        with self._lock:
            if self._given is not None:
                return self._given
            if self._engine is None:
                self._engine = self._start_transport()
            return self._engine

    def _start_transport(self) -> Transport:
        """A new Transfer Engine of the protocol the daemon uses (or TENSORD_TRANSPORT)."""
        from tensord_dataplane.transport import for_protocol

        conn = self._connection
        info = (conn.server.get("transport") if conn is not None else None) or {}
        protocol = self.settings.transport or info.get("protocol") or "tcp"
        hostname = (
            self.settings.transport_host
            or (info.get("hostname") if conn is not None and conn.is_local else None)
            or "127.0.0.1"
        )
        return for_protocol(protocol, hostname)

    def close(self) -> None:
        """Close the connection; the daemon releases every pin and reservation it held."""
        super().close()
        with self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    # -- pins -----------------------------------------------------------------------------------
    def _open(
        self, name: str, version: int | None, exclude: list[str] | None = None, *, mount: bool = False
    ) -> tuple[Pin, Manifest, SlabAccess]:
        check_name(name)
        version = check_version(version)
        # mount: the daemon counts the bytes clients map (status: one copy, not two)
        have = self._have(name)  # held here until the reply: a table it refers to is among them
        request = OpenRequest(name, version, tuple(exclude or ()), frozenset(have), mount, table_refs=True)
        conn = self._conn()
        result, fds = conn.call("open", **request.to_wire())
        pin: Pin | None = None
        try:
            if isinstance(result, dict) and type(result.get("pin")) is int:  # given back if what follows fails
                pin = Pin(conn, result["pin"], name, version or 0)
            reply = OpenReply.from_wire(result, ProtocolError)
            replica = replica_from_wire(reply.replica)
            manifest = self._manifest(name, reply, replica.generation, have)
            pin = Pin(conn, reply.pin, name, manifest.version)
            if manifest.nbytes > replica.nbytes:
                raise ProtocolError(f"{name} v{manifest.version}: the manifest spans more than its slab")
            return pin, manifest, open_slab(replica, fds, transport=self._transport, manifest=manifest)
        except BaseException:  # a reply or slab this process cannot use: give everything back
            for fd in fds:
                os.close(fd)
            if pin is not None:
                with contextlib.suppress(TensordError, OSError):
                    self._release(pin)
            raise

    def _have(self, name: str) -> dict[tuple[int, int], Manifest]:
        """The manifests of `name` this client holds, by (version, generation)."""
        with self._lock:
            return {(v, g): m for (n, v, g), m in self._manifests.items() if n == name}

    def _manifest(
        self, name: str, reply: OpenReply, generation: int, have: dict[tuple[int, int], Manifest]
    ) -> Manifest:
        """The open reply's manifest: decoded and cached, or from the cache when it was left out;
        its table taken from one of `have` when the reply refers to it (`table_of`)."""
        version, wire = reply.version, reply.manifest
        key = (name, version, generation)
        with self._lock:
            cached = self._manifests.get(key)
            if cached is not None:
                self._manifests.move_to_end(key)
        if wire is None:
            if cached is None:
                raise ProtocolError(f"the daemon left out the manifest of {name} v{version}, which is not cached")
            return cached
        if reply.table_of is not None:
            base = have.get(reply.table_of)
            if base is None:
                raise ProtocolError(
                    f"the daemon gave {name} v{version} the table of a version this client did not offer"
                )
            manifest = Manifest.from_wire(wire, ProtocolError, table=base.table, like=base)
        else:
            with self._lock:  # a new version of the same layout (a training step) shares its table
                known = next((m.table for (n, _, _), m in reversed(self._manifests.items()) if n == name), None)
            manifest = Manifest.from_wire(wire, ProtocolError, known)
        if manifest.name != name or manifest.version != version or manifest.fingerprints is None:
            raise ProtocolError(f"the daemon answered {name} v{version} with another manifest")
        with self._lock:
            self._manifests[key] = manifest
            while len(self._manifests) > _CACHED_MANIFESTS:
                self._manifests.popitem(last=False)
        return manifest

    def _release(self, pin: Pin, *, wait: bool = True) -> bool:
        """Give a pin back; True if it held throughout (a remote node did not lose it).

        A pin on this node cannot be lost, so it can be given back without `wait`ing. A pin
        whose connection was lost (the daemon restarted) is gone: Unavailable says so."""
        if self._closed:
            return False
        lost = (
            f"{pin.name} v{pin.version}: the connection that pinned it was lost (the daemon at "
            f"{pin.conn.where} restarted or went away), and the pin with it; views of host memory "
            "stay readable in this process, views of GPU memory must not be used"
        )
        if not wait:
            if not pin.conn.alive():
                pin.conn.close()
                raise Unavailable(lost)
            pin.conn.post("release", **ReleaseRequest(pin.id).to_wire())
            return True
        result, _ = self._call_on(pin.conn, lost, "release", **ReleaseRequest(pin.id).to_wire())
        return ReleaseReply.from_wire(result, ProtocolError).intact
