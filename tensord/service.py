"""The ops of the control plane: argument checks, then the store. One method per op."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from sdk import wire
from sdk.errors import InvalidArgument, ProtocolError
from sdk.manifest import specs_from_wire
from sdk.names import check_name, check_prefix, check_version
from tensord import __version__
from tensord.rpc import Session
from tensord.store import Held, Store

log = logging.getLogger(__name__)


def _args(request: dict[str, Any], *required: str, optional: tuple[str, ...] = ()) -> list[Any]:
    """The request's args in order; unknown or missing keys are errors."""
    known = {"op", *required, *optional}
    unknown = set(request) - known
    if unknown:
        raise InvalidArgument(f"{request['op']}: unknown arguments {sorted(unknown)}")
    missing = [k for k in required if k not in request]
    if missing:
        raise InvalidArgument(f"{request['op']}: missing arguments {missing}")
    return [request.get(k) for k in (*required, *optional)]


class Service:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.started = time.time()
        self._pins = itertools.count(1)

    async def handle(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        method = getattr(self, "op_" + request["op"])
        return await method(session, request)

    def session_closed(self, session: Session) -> None:
        for held in session.pins.values():
            self.store.unpin(held)
        session.pins.clear()
        for rid in session.reservations:
            self.store.abort(rid)
        session.reservations.clear()

    # -- session ------------------------------------------------------------------------------
    async def op_hello(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        protocol, client = _args(request, "protocol", optional=("client",))
        if protocol != wire.PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol {protocol!r} unsupported; this daemon speaks {wire.PROTOCOL_VERSION}"
            )
        session.hello = True
        if isinstance(client, str):
            session.peer = f"{client[:64]} ({session.peer})"
        return {"protocol": wire.PROTOCOL_VERSION, "node": self.store.node, "version": __version__}, []

    # -- reading ------------------------------------------------------------------------------
    async def op_open(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version = _args(request, "name", optional=("version",))
        held = await self.store.resolve(check_name(name), check_version(version))
        self.store.pin(held)
        pin = next(self._pins)
        session.pins[pin] = held
        replica, fds = held.slab.descriptor()
        return {"pin": pin, "manifest": held.manifest.to_wire(), "replica": replica}, fds

    async def op_release(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (pin,) = _args(request, "pin")
        held = session.pins.pop(pin, None) if isinstance(pin, int) else None
        if held is not None:
            self.store.unpin(held)
        return {"released": held is not None}, []

    # -- writing ------------------------------------------------------------------------------
    async def op_put_begin(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, device, tensors = _args(request, "name", "device", "tensors")
        if not isinstance(device, str):
            raise InvalidArgument("device must be a string like 'cpu' or 'cuda:0'")
        r = self.store.reserve(check_name(name), device, specs_from_wire(tensors), f"put by {session.peer}")
        session.reservations.add(r.id)
        replica, fds = r.slab.descriptor()
        return {"reservation": r.id, "manifest": r.manifest.to_wire(), "replica": replica}, fds

    async def op_put_commit(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        rid, fingerprints = _args(request, "reservation", "fingerprints")
        self._own(session, rid)
        if not isinstance(fingerprints, list):
            raise InvalidArgument("fingerprints must be a list")
        held = await self.store.commit(rid, fingerprints)
        session.reservations.discard(rid)
        return {"version": held.manifest.version}, []

    async def op_put_abort(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (rid,) = _args(request, "reservation")
        self._own(session, rid)
        self.store.abort(rid)
        session.reservations.discard(rid)
        return {}, []

    def _own(self, session: Session, rid: object) -> None:
        if rid not in session.reservations:
            raise InvalidArgument(f"reservation {rid!r} does not belong to this connection")

    async def op_delete(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version = _args(request, "name", optional=("version",))
        deleted = await self.store.delete(check_name(name), check_version(version, allow_latest=False))
        log.info("deleted %s%s: %d versions", name, f" v{version}" if version else "", deleted)
        return {"deleted": deleted}, []

    # -- catalogue ----------------------------------------------------------------------------
    async def op_ls(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        (prefix,) = _args(request, optional=("prefix",))
        registry = self.store.registry
        out = []
        for name in await registry.names(check_prefix(prefix or "")):
            versions = await registry.versions(name)
            if not versions:
                continue
            latest = await registry.resolve(name)
            manifest = await registry.manifest(name, latest)
            held = self.store.held.get((name, latest))
            out.append({
                "name": name, "latest": latest, "versions": versions, "nbytes": manifest.data_bytes,
                "tensors": len(manifest.tensors), "device": held.slab.device if held else None,
            })  # fmt: skip
        return out, []

    async def op_info(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        name, version = _args(request, "name", optional=("version",))
        registry = self.store.registry
        version = await registry.resolve(check_name(name), check_version(version))
        manifest = await registry.manifest(name, version)
        held = self.store.held.get((name, version))
        return {
            "name": name,
            "version": version,
            "latest": await registry.resolve(name),
            "versions": await registry.versions(name),
            "tensors": {
                t.name: {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                for t in manifest.tensors
            },  # fmt: skip
            "nbytes": manifest.data_bytes,
            "slab_bytes": manifest.nbytes,
            "created": manifest.created,
            "origin": manifest.origin,
            "device": held.slab.device if held else None,
            "pins": held.pins if held else 0,
            "replicas": [r.to_wire() for r in await registry.replicas(name, version)],
        }, []

    async def op_status(self, session: Session, request: dict[str, Any]) -> tuple[Any, list[int]]:
        _args(request)
        store = self.store
        live: list[Held] = [h for h in store.held.values() if h.live]
        return {
            "node": store.node,
            "version": __version__,
            "uptime": time.time() - self.started,
            "devices": {
                d: {"budget": store.budgets.limit[d], "used": store.budgets.used[d]}
                for d in store.budgets.limit
            },  # fmt: skip
            "sets": len({h.manifest.name for h in live}),
            "versions": len(live),
            "pins": sum(h.pins for h in store.held.values()),
            "reservations": len(store.reservations),
        }, []
