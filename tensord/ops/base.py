"""What every op group shares: the store, this node's collaborators (`NodeContext`: its name,
registry, metrics, Transfer Engine), the fleet's parts each op uses (the cluster for pulls and
remote pins, `Serving` for the holder's side of a stream, the pair groups, the peers), pins
handed to sessions, and a few helpers. `Service` combines the groups into one class."""

from __future__ import annotations

import asyncio
import itertools
import select
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from tensord.context import NodeContext
from tensord.fleet.cluster import Cluster
from tensord.fleet.pairs import Pairs
from tensord.fleet.serve import Serving
from tensord.ingest.pipeline import Progress
from tensord.peers import Peers
from tensord.records import Held
from tensord.restore import Restorer
from tensord.rpc import Session, brief
from tensord.store import Store
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument, Unavailable
from tensord_contract.manifest import Manifest, Table
from tensord_contract.table_messages import PublishRequest, PutBeginRequest

M = TypeVar("M", PutBeginRequest, PublishRequest)
T = TypeVar("T")

#: how often an op that waits on a client's behalf looks whether that client closed its socket
HANGUP_POLL = 0.5

#: tables of more tensors than this are decoded or listed on a worker thread, off the event loop
OFF_LOOP_TENSORS = 2_000


class Ops:
    def __init__(
        self,
        store: Store,
        context: NodeContext,
        cluster: Cluster | None = None,
        *,
        peers: Peers | None = None,
        serving: Serving | None = None,
        pairs: Pairs | None = None,
        pull_through: bool = False,
        listen: str = "",
        allowed_roots: tuple[str, ...] = (),
    ) -> None:
        self.store, self.context, self.cluster = store, context, cluster
        #: the fleet's parts, handed in (built with the cluster; None without one), never
        #: reached through it: other daemons, the holder's side of streams, pair groups
        self.peers, self.serving, self.pairs = peers, serving, pairs
        self.node, self.registry, self.metrics = context.node, context.registry, context.metrics
        self.pull_through, self.listen = pull_through, listen
        self.allowed_roots = allowed_roots
        self.restorer: Restorer | None = None  # set by the daemon: what it held before a restart
        #: set once the registry is up: the socket accepts before that (the node record needs
        #: its address), and requests other than hello wait here instead of failing
        self.ready = asyncio.Event()
        self.started = time.time()
        self._pins = itertools.count(1)
        self._watches: dict[int, dict[str, tuple[asyncio.Task[None], asyncio.Queue[int], int]]] = {}
        self._loads: dict[int, tuple[str, Progress]] = {}  # checkpoint loads in progress (ops/files.py)

    def _moved(self, session: Session, held: Held, direction: str) -> None:
        """Count a version's bytes handed to a reader or taken from a writer, by path."""
        path = {"cpu": "host"}.get(held.slab.device, "cuda_ipc") if session.local else "transfer_engine"
        self.metrics.moved(path, direction, held.manifest.data_bytes)

    @staticmethod
    async def _decode(message: type[M], request: dict[str, Any], known: Table | None = None) -> M:
        """A request carrying a tensor table, decoded (`message.from_wire`, InvalidArgument);
        one of a large table off the event loop unless it is `known` (the table of the set's
        newest version, compared as bytes: a training step's put is not decoded again)."""
        tensors = request.get("tensors")
        count = tensors.get("count") if isinstance(tensors, dict) else None
        if is_int(count, OFF_LOOP_TENSORS + 1) and not (known is not None and known.same_wire(tensors)):
            return await asyncio.to_thread(message.from_wire, request, InvalidArgument, known)
        return message.from_wire(request, InvalidArgument, known)

    def _own(self, session: Session, rid: object) -> None:
        if not is_int(rid) or rid not in session.reservations:
            raise InvalidArgument(f"reservation {brief(rid)} does not belong to this connection")

    async def _manifest(self, name: str, version: int) -> Manifest:
        """A committed manifest: from memory when this node holds the version (it never changes)."""
        held = self.store.lookup(name, version)
        return held.manifest if held is not None else await self.registry.manifest(name, version)


async def unless_gone(session: Session, waited: Awaitable[T], timeout: float) -> T:
    """`asyncio.wait_for(waited, timeout)`, but Unavailable as soon as the session's client has
    closed its Unix socket (a reply it can never read; the session then closes and gives back
    what it held, instead of at the timeout). A TCP peer's close is a half-close to the daemon
    (FIN) and is seen only when the wait ends."""
    task = asyncio.ensure_future(waited)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            await asyncio.wait({task}, timeout=max(0.0, min(deadline - loop.time(), HANGUP_POLL)))
            if task.done():
                return task.result()
            if loop.time() >= deadline:
                raise TimeoutError
            if _hung_up(session.fd):
                raise Unavailable("the client closed its connection while the daemon waited for it")
    finally:
        task.cancel()


def _hung_up(fd: int) -> bool:
    """Whether the peer of socket `fd` closed it: POLLHUP (a Unix socket's peer gone, not a
    half-close, which is POLLRDHUP alone) or an error."""
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, select.POLLHUP | select.POLLERR)
    return any(events & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, events in poller.poll(0))
