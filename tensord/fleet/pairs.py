"""Two-rank process groups between daemons, for peers the Transfer Engine cannot reach (or
`transport.protocol = "nccl"`): the holder *sends* the chunks it grants, the puller receives
them, with NCCL point-to-point between GPU slabs and gloo between host slabs (torch.distributed
either way; gloo is what the CPU-only test machines run).

One group per (holder, puller, backend, holder's device, puller's device), made once and kept:
NCCL needs about a second to set one up, and its communicator is bound to the GPU of each side.
Rendezvous: the puller starts a TCPStore on a free port of its advertised address, asks the
holder (`stream_pair`) to join, and both build the group, rank 0 the holder (sender) and rank 1
the puller (receiver). A group carries one direction only, so two daemons pulling
from each other never wait on each other's sends. Transfers on one group are one at a time
(the puller holds its lock from request to last byte): the holder's sends and the puller's
receives match in order.

Unlike a one-sided read, the holder's GPU runs the copy kernels: it is disruptive to work on
that GPU (DESIGN.md). A peer that dies mid-transfer leaves the receive blocked until the group's
timeout; the pull gives up on that group (and the peer) after `timeout` seconds and re-sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tensord.fleet.chunks import Grid
from tensord.memory import CudaSlab, HostSlab, Slab
from tensord_contract.errors import TransferError, Unavailable
from tensord_contract.streams import StreamPairRequest

log = logging.getLogger(__name__)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def link(backend: str, mine: str, theirs: str) -> tuple[str, str, str]:
    """What tells a group apart besides its peer and direction: NCCL communicators are bound to
    one GPU on each side; gloo groups move host memory, wherever it lies."""
    return (backend, mine, theirs) if backend == "nccl" else (backend, "", "")


def available(device: str, peer_device: str | None = None) -> tuple[bool, str]:
    """Whether a pair group can move a slab on `device` here (to or from one on `peer_device`
    there), and why not."""
    if peer_device is not None and backend_for(device) != backend_for(peer_device):
        return False, f"pair groups move GPU to GPU or host to host, not {peer_device} to {device}"
    try:
        import torch.distributed as dist
    except ImportError as exc:  # pragma: no cover - torch always has it on Linux
        return False, f"torch.distributed is missing: {exc}"
    if not dist.is_available():
        return False, "this torch build has no torch.distributed"
    if backend_for(device) == "nccl" and not dist.is_nccl_available():
        return False, "this torch build has no NCCL"
    if backend_for(device) == "gloo" and not dist.is_gloo_available():
        return False, "this torch build has no gloo"
    return True, ""


@dataclass(eq=False)
class Group:
    """One two-rank group and the one thread that runs its transfers, in sequence order: the
    holder numbers its pushes (`seq`) as it grants them, the puller runs the receive of push n
    only after that of n - 1, whatever order the replies came in (two pulls may share a group)."""

    peer: str
    backend: str
    rank: int  # 0: this side sends, 1: it receives
    pg: Any
    store: Any  # kept alive: the TCPStore the group rendezvoused through
    ready: float = 0.0  # seconds the setup took
    broken: bool = False
    seq: int = 0  # the next push to run
    issued: int = 0  # the sender's next push number
    _jobs: dict[int, tuple[Callable[[], None], Future[None]]] = field(default_factory=dict)
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def submit(self, seq: int, job: Callable[[], None]) -> Future[None]:
        """Run `job` as push `seq` of this group, after every earlier one."""
        fut: Future[None] = Future()
        with self._cv:
            if self.broken:
                fut.set_exception(TransferError(f"the pair group with {self.peer} broke earlier"))
                return fut
            self._jobs[seq] = (job, fut)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"pair-{self.peer}-{self.rank}", daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while self.seq not in self._jobs and not self.broken:
                    self._cv.wait()
                if self.broken:
                    for _, fut in self._jobs.values():
                        if not fut.done():
                            fut.set_exception(TransferError(f"the pair group with {self.peer} broke"))
                    self._jobs.clear()
                    return
                job, fut = self._jobs.pop(self.seq)
                self.seq += 1
            try:
                job()  # run even if nobody waits any more: the other side sends (or receives) anyway
                if not fut.done():
                    fut.set_result(None)
            except Exception as exc:
                self.abandon()
                if not fut.done():
                    fut.set_exception(TransferError(f"{self.backend} transfer with {self.peer} failed: {exc}"))

    def abandon(self) -> None:
        """Give the group up (a transfer failed or never came): the next pull makes a new one."""
        with self._cv:
            self.broken = True
            self._cv.notify_all()


def _make_group(store: Any, key: str, rank: int, backend: str, timeout: float) -> Any:
    import torch.distributed as dist

    prefixed = dist.PrefixStore(key, store)
    if backend == "nccl":
        # A peer dying mid-transfer must abort the communicator, not this process (NCCL's
        # default tears the whole process down when a collective times out).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timedelta(seconds=timeout)
        return dist.ProcessGroupNCCL(prefixed, rank, 2, options)
    return dist.ProcessGroupGloo(prefixed, rank, 2, timedelta(seconds=timeout))


@contextlib.contextmanager
def slab_tensor(slab: Slab, *, writable: bool) -> Iterator[Any]:
    """The slab as a flat uint8 tensor for the length of the block: a GPU slab's own tensor; a
    host slab mapped shared (`writable`: a slab being filled) or copy-on-write (a sealed one),
    unmapped afterwards (a writable mapping left behind would keep the slab from being sealed)."""
    if isinstance(slab, CudaSlab):
        yield slab.tensor
        return
    if not isinstance(slab, HostSlab):
        raise TransferError(f"no pair-group transfers for slabs on {slab.device}")
    from tensord_dataplane.host import HostAccess

    access = HostAccess(os.dup(slab.fd), slab.nbytes, slab.generation, writable=writable)
    try:
        yield access.base()[: slab.nbytes]
    finally:
        access.close()


@contextlib.contextmanager
def _on(device: Any) -> Iterator[None]:
    """Run on `device` (this worker thread's current GPU), or nowhere in particular for host memory."""
    if getattr(device, "type", "cpu") != "cuda":
        yield
        return
    import torch

    with torch.cuda.device(device):
        yield


def _ranges(grid: Grid, chunks: list[int]) -> list[tuple[int, int, int]]:
    """(chunk, first byte, length) of each chunk, in the order granted: both sides send and
    receive one chunk per operation, in this order."""
    starts, lengths = grid.ranges(chunks)
    return list(zip(chunks, starts.tolist(), lengths.tolist(), strict=True))


class Pairs:
    """This daemon's pair groups."""

    def __init__(self, node: str, host: str, *, timeout: float = 60.0) -> None:
        self.node, self.host, self.timeout = node, host, timeout
        self._groups: dict[tuple[str, int, str, str, str], Group] = {}
        self._setup: dict[tuple[str, int, str, str, str], asyncio.Lock] = {}
        self.created = 0  # groups made (each costs a rendezvous; NCCL's about a second)

    # -- the puller's side --------------------------------------------------------------------
    async def receiver(
        self, peer: str, device: str, source: str, join: Callable[[StreamPairRequest], Awaitable[Any]]
    ) -> Group:
        """The group in which `peer` sends from its slab on `source` to this node's on `device`,
        made on first use: `join(request)` asks the peer to join (an RPC of `stream_pair`)."""
        backend = backend_for(device)
        key = (peer, 1, *link(backend, device, source))
        group = self._groups.get(key)
        if group is not None and not group.broken:
            return group
        lock = self._setup.setdefault(key, asyncio.Lock())
        async with lock:
            group = self._groups.get(key)
            if group is not None and not group.broken:
                return group
            ok, why = available(device, source)
            if not ok:
                raise Unavailable(f"no pair group to {peer}: {why}")
            import torch.distributed as dist

            t0 = time.monotonic()
            store = await asyncio.to_thread(
                dist.TCPStore, self.host, 0, 2, True, timeout=timedelta(seconds=self.timeout), wait_for_workers=False
            )
            name = f"tensord/{peer}>{self.node}/{secrets.token_hex(8)}"
            build = asyncio.create_task(asyncio.to_thread(_make_group, store, name, 1, backend, self.timeout))
            try:
                await join(StreamPairRequest(self.node, self.host, int(store.port), name, backend, source, device))
                pg = await asyncio.wait_for(build, self.timeout)
            except BaseException:
                build.cancel()
                raise
            group = Group(peer, backend, 1, pg, store, ready=time.monotonic() - t0)
            self._groups[key] = group
            self.created += 1
            log.info("pair group %s -> %s (%s) ready in %.2f s", peer, self.node, backend, group.ready)
            return group

    def receive(
        self, group: Group, seq: int, slab: Slab, grid: Grid, granted: list[int], keep: set[int]
    ) -> Future[None]:
        """Receive push `seq`: every granted chunk in the holder's order, those in `keep` into
        `slab`, the others (declined: they came from elsewhere first) into scratch memory."""

        def job() -> None:
            import torch

            if not keep.intersection(granted):  # nothing to keep: the slab is not even mapped
                device = torch.device(slab.device)
                with _on(device):
                    for _, _, n in _ranges(grid, granted):
                        group.pg.recv([torch.empty(n, dtype=torch.uint8, device=device)], 0, 0).wait()
                return
            with slab_tensor(slab, writable=True) as base, _on(base.device):
                for c, a, n in _ranges(grid, granted):
                    dst = base[a : a + n] if c in keep else torch.empty(n, dtype=torch.uint8, device=base.device)
                    group.pg.recv([dst], 0, 0).wait()
                if base.device.type == "cuda":
                    torch.cuda.synchronize(base.device)

        return group.submit(seq, job)

    # -- the holder's side --------------------------------------------------------------------
    def join(self, request: StreamPairRequest) -> float:
        """Join the group a peer (`request.node`) set up to receive from this node's slabs on
        `request.device` into its own on `request.to` (blocking). Seconds taken."""
        import torch.distributed as dist

        peer, host, port, key, backend = request.node, request.host, request.port, request.key, request.backend
        device, to = request.device, request.to
        ok, why = available(device, to)
        if not ok or backend != backend_for(device):
            raise Unavailable(f"no {backend} pair group from {device} to {peer}'s {to}: {why or 'wrong backend'}")
        link_key = (peer, 0, *link(backend, device, to))
        t0 = time.monotonic()
        store = dist.TCPStore(host, port, 2, False, timeout=timedelta(seconds=self.timeout))
        pg = _make_group(store, key, 0, backend, self.timeout)
        group = Group(peer, backend, 0, pg, store, ready=time.monotonic() - t0)
        old = self._groups.get(link_key)
        self._groups[link_key] = group
        self.created += 1
        if old is not None:
            old.abandon()
        log.info("pair group %s -> %s (%s) joined in %.2f s", self.node, peer, backend, group.ready)
        return group.ready

    def send(self, peer: str, to: str, target: Any, grid: Grid, granted: list[int]) -> int:
        """Queue the sends of granted chunks of `target` (a Held or Partial replica) to `peer`'s
        slab on `to` as its next push; the push's number, which the reply carries. Returns -1
        when there is no group (the puller then fails that source and asks elsewhere)."""
        here = target.slab.device
        group = self._groups.get((peer, 0, *link(backend_for(here), here, to)))
        if group is None or group.broken:
            log.warning("no pair group to send %d chunks to %s", len(granted), peer)
            return -1
        seq, group.issued = group.issued, group.issued + 1  # numbered here, in grant order

        def job() -> None:
            import torch

            # copy-on-write, never shared writable: a partial replica must stay sealable meanwhile
            with slab_tensor(target.slab, writable=False) as base, _on(base.device):
                for _, a, n in _ranges(grid, granted):
                    group.pg.send([base[a : a + n]], 1, 0).wait()
                if base.device.type == "cuda":
                    torch.cuda.synchronize(base.device)

        group.submit(seq, job)
        return seq

    def status(self) -> dict[str, Any]:
        return {
            "groups": sum(1 for g in self._groups.values() if not g.broken),
            "created": self.created,
            "setup_s": [round(g.ready, 3) for g in self._groups.values()],
        }

    def close(self) -> None:
        for g in self._groups.values():
            g.abandon()
            abort = getattr(g.pg, "abort", None)
            if abort is not None:
                try:
                    abort()
                except Exception:  # teardown logs rather than raises
                    log.debug("aborting pair group with %s", g.peer, exc_info=True)
        self._groups.clear()
