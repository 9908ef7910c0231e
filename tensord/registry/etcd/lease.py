"""A node's etcd lease as a session (etcd's ``concurrency.Session``).

The session is granted once in `start` and kept alive by one task every TTL/3. It says where it
stands (`state`, `status`): ``held`` while the last keepalive succeeded, ``failing`` while etcd
cannot be reached but the lease may still stand, ``lost`` once etcd said it is gone or a whole
TTL passed without a keepalive answered, ``none`` before `start` and after `close`. Losing it
sets the `lost` event and calls the `on_lost` callbacks.

A lost lease is replaced: a new one is granted and the owner's `register` hook puts everything
it advertises under it; the new lease is adopted only once that succeeded. When etcd comes back
still holding the old lease (etcd keeps leases across its own restarts), the old one is simply
held again. `close` revokes the lease: every key under it goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from tensord.registry.etcd.connection import Connection, LeaseNotFound
from tensord_contract.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
LeaseState = Literal["held", "failing", "lost", "none"]


class LeaseSession:
    """One lease and its keepalive task. Safe for concurrent use by tasks of one loop."""

    def __init__(self, connection: Connection, ttl: float, register: Callable[[int], Awaitable[None]]) -> None:
        self._conn = connection
        self._ttl = ttl  # as asked
        self._register = register  # puts everything the owner holds under the given lease
        self._name = ""  # the node's, for logs
        self.id: int | None = None
        self.ttl = 0  # as granted
        #: held by (re-)registration; the owner holds it while it changes what `register` puts
        self.lock = asyncio.Lock()
        #: set while the lease is lost, cleared once one is held again
        self.lost = asyncio.Event()
        self.lost_count = 0
        self._failing = False  # the last keepalive failed
        self._confirmed = 0.0  # monotonic time of the last grant or answered keepalive
        self._on_lost: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def state(self) -> LeaseState:
        if self.id is None or self._closed:
            return "none"
        if self.lost.is_set():
            return "lost"
        return "failing" if self._failing else "held"

    def status(self) -> dict[str, Any]:
        since = time.monotonic() - self._confirmed if self.id is not None else None
        return {
            "lease": self.state,
            "lease_id": f"{self.id:x}" if self.id is not None else None,
            "ttl": self.ttl,
            "since_keepalive": since,  # seconds since etcd last confirmed the lease
            "lost_count": self.lost_count,
        }

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time the lease is lost (on the event loop; it must not block)."""
        self._on_lost.append(callback)

    async def start(self, name: str) -> None:
        """Grant the lease for node `name`, register under it, and start the keepalive."""
        if self._task is not None:
            raise RuntimeError("EtcdRegistry.start called twice")
        self._name = name
        async with self.lock:
            await self._grant_and_register()
        self._task = asyncio.create_task(self._keep_alive(), name=f"etcd-lease-{self._name}")

    async def close(self) -> None:
        """Stop the keepalive and revoke the lease (its keys go with it); idempotent."""
        if self._closed:
            return
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.id is not None:
            try:
                with self._conn.call("lease revoke") as c:
                    await c.revoke_lease(self.id)
            except Unavailable as exc:
                log.warning("could not revoke etcd lease %x (it expires by itself): %s", self.id, exc)
        self._closed = True
        self.id = None

    def require(self) -> int:
        if self.id is None:
            raise RuntimeError("EtcdRegistry used before start()")
        return self.id

    async def with_lease(self, fn: Callable[[int], Awaitable[T]]) -> T:
        """Run `fn(lease)` under the lock; when etcd says the lease is gone, re-grant once."""
        lease = self.require()
        try:
            async with self.lock:
                return await fn(lease)
        except LeaseNotFound:
            self._lose(lease, "etcd no longer has it")
            await self.regrant(lease)
        lease = self.require()
        async with self.lock:
            return await fn(lease)

    async def regrant(self, stale: int | None) -> None:
        """Replace lease `stale` with a new one, unless another task already did."""
        async with self.lock:
            if self.id == stale and not self._closed:
                await self._grant_and_register()
                log.warning(
                    "etcd lease %s lost; node %s registered again under lease %x", _hex(stale), self._name, self.id
                )

    async def _grant_and_register(self) -> None:
        """Grant a new lease and register under it. Holds the lock.

        If this fails half way, the old (lost) lease stays current and the next keepalive tries again.
        """
        with self._conn.call("lease grant") as c:
            granted = await c.lease(max(1, math.ceil(self._ttl)))
        await self._register(granted.id)
        self.id, self.ttl = granted.id, granted.ttl
        self._confirm()

    def _confirm(self) -> None:
        self._confirmed = time.monotonic()
        self._failing = False
        self.lost.clear()

    def _lose(self, lease: int | None, why: str) -> None:
        if self.lost.is_set() or lease != self.id or self._closed:
            return
        self.lost_count += 1
        self.lost.set()
        log.warning("etcd lease %s of node %s lost: %s", _hex(lease), self._name, why)
        for callback in self._on_lost:
            try:
                callback()
            except Exception:  # one bad listener must not stop the keepalive
                log.exception("etcd lease loss callback")

    async def _keep_alive(self) -> None:
        """Refresh the lease every TTL/3; re-grant and re-register when it is gone."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            lease = self.id
            try:
                with self._conn.call("lease keepalive") as c:
                    reply = await c.refresh_lease(lease)
                if reply is None or reply.TTL <= 0:
                    self._lose(lease, "etcd says it expired")
                    await self.regrant(lease)
                elif lease == self.id:
                    if self._failing or self.lost.is_set():
                        log.info("etcd reachable again; lease %x holds", lease)
                    self._confirm()
            except Unavailable as exc:
                if not self._failing:
                    log.warning("etcd lease keepalive failing (will retry): %s", exc)
                self._failing = True
                if time.monotonic() - self._confirmed >= self.ttl:
                    self._lose(lease, f"no keepalive answered for {self.ttl} s")
            except Exception:  # a bug here must not end the lease silently
                log.exception("etcd lease keepalive")


def _hex(lease: int | None) -> str:
    return "?" if lease is None else f"{lease:x}"
