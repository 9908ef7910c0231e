"""Mooncake Transfer Engine transport: one-sided reads and writes to peers across nodes.

Facts this module relies on (``mooncake-transfer-engine`` 0.3.13, Python binding
``mooncake.engine.TransferEngine``):

- ``initialize(hostname, "P2PHANDSHAKE", protocol, device_names) -> int`` (0 = ok). With P2P
  handshake there is no metadata server: a peer's session id is ``"hostname:get_rpc_port()"``.
  The protocol string only picks the buffer allocator; the transport itself is chosen from the
  environment (``MC_FORCE_TCP``, ``MC_FORCE_HCA``, ``MC_INTRA_NVLINK``, ``MC_FORCE_MNNVL``) and
  from RDMA auto-discovery, which falls back to TCP silently when no NIC is found. That is why
  ``configure_env`` sets them explicitly.
- Return codes: 0 ok; -1 for any failed transfer; registration: -3 address not registered,
  -7 overlapping region (``include/error.h``). Native calls release the GIL.
- Over TCP the peer rejects remote ranges outside its registered memory at once (rc -1), but an
  unregistered *local* buffer is not checked, so this module checks local ranges itself.
- Over TCP at most ``MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER + MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER``
  entries (default 1024 + 1024) may be in flight to one peer. A batch beyond that fails (rc -1,
  "TCP lane queue-full rejection") and every later transfer to that peer fails too (still after
  15 s in our test; other peers are unaffected). So
  ``configure_env`` raises both to their maximum (65535) and batches are split into native calls
  of at most ``max_batch_entries`` entries (default 1024 over TCP, 4096 otherwise).
- A dead peer (closed socket) fails at once; a peer that stops answering fails after
  ``MC_TRANSFER_TIMEOUT`` seconds (default 30, at least 5) plus 1 ns per byte.
- Readers cache a peer's description of its registered memory (``MC_DISABLE_METACACHE``
  unset); over NVLink (and RDMA) a range the peer registered after the first read is then
  refused ("Requested address ... not found"). Slabs come and go, so ``configure_env`` turns
  the cache off for those protocols: each native call fetches the peer's description once.
- Both listeners (handshake RPC and TCP data) bind to all interfaces whatever the hostname:
  registered memory is readable by anyone who can reach those ports.
- ``batch_transfer_sync_*`` waits for completion by polling the engine without pause: every
  transfer in flight keeps a core busy. Over TCP, where the engine's own threads move the bytes
  on the same cores, that starves them (measured on a 2-core VM: 16 concurrent 2 MiB reads at
  0.40 GB/s in all, 1.66 GB/s waited for as below; one read alone 2.2 against 1.4). So over
  TCP a batch of up to
  ``_POLLED`` entries is submitted as one asynchronous transfer per entry
  (``batch_transfer_async_*``; ``transfer_check_status`` reports on one entry per transfer,
  hence one entry each), and one thread per engine waits for all of them with sleeps of 20 to
  200 us (``mooncake_poller``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from tensord_contract.errors import InvalidArgument, TransferError
from tensord_dataplane.env import env_int

from .base import Batch, Entry, Registrations, Transport, coalesce
from .mooncake_mover import Mover
from .mooncake_poller import Poller, Wait

__all__ = ["PROTOCOLS", "MooncakeTransport", "available", "configure_env", "resolve_protocol"]

logger = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "rdma", "nvlink_intra", "auto")
# MC_INTRA_NVLINK is read by the 0.3.13 CPU wheel, MC_INTRANODE_NVLINK by the 0.3.14 CUDA wheels.
_NVLINK = ("MC_INTRA_NVLINK", "MC_INTRANODE_NVLINK")
_SELECTORS = ("MC_FORCE_TCP", "MC_FORCE_HCA", "MC_FORCE_MNNVL", *_NVLINK, "MC_TE_FILTERS", "MC_DISABLE_METACACHE")
_NIC = re.compile(r"[A-Za-z0-9_.:-]+")
_IB_SYSFS = "/sys/class/infiniband"
_MIN_TIMEOUT_S = 5  # Mooncake clamps MC_TRANSFER_TIMEOUT to at least 5 s
_TCP_QUEUE_MAX = "65535"  # the largest value Mooncake accepts for its per-peer TCP queues
#: `Transport.entry_bytes`: an entry costs ~37 us over TCP on the VM (~60 KB at 1.6 GB/s), a few
#: us over RDMA; over nvlink_intra each entry fetches the peer's description (metadata cache off)
_ENTRY_BYTES = {"tcp": 64 << 10, "rdma": 64 << 10, "nvlink_intra": 64 << 20}
_POLLED = 64  # over TCP, batches of at most this many entries are waited for with sleeps


def _rdma_devices() -> list[str]:
    try:
        return sorted(os.listdir(_IB_SYSFS))
    except OSError:
        return []


def _load_engine_module() -> Any:
    return importlib.import_module("mooncake.engine")


def available(protocol: str = "tcp") -> tuple[bool, str]:
    """Whether a ``MooncakeTransport`` with this protocol can start here, and why not."""
    if protocol not in PROTOCOLS:
        return False, f"unknown protocol {protocol!r}, expected one of {PROTOCOLS}"
    try:
        engine = _load_engine_module()
    except (ImportError, OSError) as exc:
        return False, f"mooncake-transfer-engine is not installed or cannot load: {exc}"
    if protocol == "nvlink_intra" and not getattr(engine, "SUPPORT_INTRA_NVLINK", False):
        return False, "this Mooncake build has no intra-node NVLink transport (SUPPORT_INTRA_NVLINK is False)"
    if protocol == "rdma" and not _rdma_devices():
        return False, f"no RDMA devices under {_IB_SYSFS}"
    return True, ""


def resolve_protocol(protocol: str) -> str:
    """``auto`` becomes ``rdma`` when RDMA devices exist, else ``tcp``; others pass through."""
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"unknown transport protocol {protocol!r}", protocol=protocol, allowed=PROTOCOLS)
    if protocol == "auto":
        return "rdma" if _rdma_devices() else "tcp"
    return protocol


def configure_env(
    protocol: str, nics: Sequence[str] | None = None, *, timeout_s: float | None = None
) -> dict[str, str | None]:
    """The Mooncake environment for these options: name -> value, None meaning "unset";
    variables not in the result are left as they are.

    The only place that decides Mooncake's environment; ``MooncakeTransport`` applies the
    result just before it creates the engine. ``nics`` restricts RDMA to these devices.
    """
    proto = resolve_protocol(protocol)
    if nics is not None:
        if isinstance(nics, str) or not nics or not all(isinstance(n, str) and _NIC.fullmatch(n) for n in nics):
            raise InvalidArgument("nics must be a non-empty list of device names", nics=nics)
        if proto != "rdma":
            raise InvalidArgument(f"nics apply to rdma only, not {proto}", protocol=protocol, nics=list(nics))
    env: dict[str, str | None] = dict.fromkeys(_SELECTORS)
    if proto == "tcp":
        env["MC_FORCE_TCP"] = "1"
        env["MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER"] = _TCP_QUEUE_MAX
        env["MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER"] = _TCP_QUEUE_MAX
    elif proto == "rdma":
        env["MC_FORCE_HCA"] = "1"  # fail when no NIC works instead of falling back to TCP
        if nics is not None:
            env["MC_TE_FILTERS"] = ",".join(nics)
    else:
        env.update(dict.fromkeys(_NVLINK, "1"))
    if proto == "rdma":
        # A peer's registered memory changes with every slab it allocates; with the cache on,
        # a reader keeps the peer's first description and refuses ranges registered later.
        # (nvlink_intra keeps it on and renews its moving engine instead: `mooncake_mover`.)
        env["MC_DISABLE_METACACHE"] = "1"
    if timeout_s is not None:
        if not timeout_s > 0:
            raise InvalidArgument("timeout_s must be positive", timeout_s=timeout_s)
        env["MC_TRANSFER_TIMEOUT"] = str(max(_MIN_TIMEOUT_S, math.ceil(timeout_s)))
    return env


def _entry_bytes(protocol: str) -> int:
    """`Transport.entry_bytes` of a protocol (TENSORD_ENTRY_BYTES fixes it: a diagnostic)."""
    return env_int("TENSORD_ENTRY_BYTES", _ENTRY_BYTES[protocol], 0, 1 << 40)


def _start_engine(hostname: str, protocol: str, devices: str) -> Any:
    try:
        engine = _load_engine_module().TransferEngine()
        rc = engine.initialize(hostname, "P2PHANDSHAKE", protocol, devices)
    except Exception as exc:
        raise TransferError(f"Mooncake engine failed to start on {hostname} ({protocol}): {exc}") from exc
    if rc != 0:
        raise TransferError(
            f"Mooncake engine failed to start on {hostname} ({protocol}), rc {rc}", rc=rc, protocol=protocol
        )
    return engine


def _apply_env(env: dict[str, str | None]) -> None:
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _topology_nics(engine: Any) -> list[str]:
    """RDMA devices the engine discovered (best effort, for the log)."""
    try:
        topo = json.loads(engine.get_local_topology())
        return sorted({nic for tiers in topo.values() for tier in tiers for nic in tier})
    except Exception:  # only used for logging
        return []


class MooncakeTransport(Transport):
    """One Mooncake Transfer Engine with P2P handshake; ``session`` is ``"hostname:port"``.

    ``hostname`` is what peers use to reach this engine (an address on the cluster fabric).
    ``timeout_s`` bounds a transfer to a peer that stops answering (Mooncake default 30 s).
    A batch is one native call when it has at most ``max_batch_entries`` entries after
    coalescing; larger batches are split into the fewest such calls.
    Mooncake reads its environment when an engine starts: engines created one after another in
    one process may use different options, but its log level is fixed by the first one.
    """

    name = "mooncake"

    def __init__(
        self,
        hostname: str = "127.0.0.1",
        protocol: str = "tcp",
        nics: Sequence[str] | None = None,
        *,
        timeout_s: float | None = None,
        max_batch_entries: int | None = None,
    ) -> None:
        if max_batch_entries is not None and (not isinstance(max_batch_entries, int) or max_batch_entries < 1):
            raise InvalidArgument("max_batch_entries must be a positive int", max_batch_entries=max_batch_entries)
        if not isinstance(hostname, str) or not hostname or ":" in hostname:
            raise InvalidArgument("hostname must be a host name or IPv4 address", hostname=hostname)
        self.protocol = resolve_protocol(protocol)
        # TCP lanes take at most ~2048 entries in flight (see above); the others take large
        # batches, and each native call fetches the peer's description (metadata cache off)
        default = 1024 if self.protocol == "tcp" else 4096
        self.max_batch_entries = max_batch_entries if max_batch_entries is not None else default
        self.entry_bytes = _entry_bytes(self.protocol)
        ok, why = available(self.protocol)
        if not ok:
            raise TransferError(f"Mooncake transport {self.protocol} is unavailable: {why}", protocol=protocol)
        env = configure_env(self.protocol, nics, timeout_s=timeout_s)
        _apply_env(env)
        devices = ",".join(nics) if nics is not None else ""
        engine = _start_engine(hostname, self.protocol, devices)
        self._engine: Any = engine
        self._session = f"{hostname}:{engine.get_rpc_port()}"
        # over nvlink_intra an engine of its own moves the bytes (see `mooncake_mover`)
        self._mover = (
            Mover(lambda: _start_engine(hostname, self.protocol, devices)) if self.protocol == "nvlink_intra" else None
        )
        if self.protocol == "nvlink_intra":
            from tensord_dataplane.cuda import enable_peer_access

            enable_peer_access()
        self._regs = Registrations(self._session)
        # over TCP, wait for transfers with sleeps (see the module's notes), where this build can
        self._polled = self.protocol == "tcp" and hasattr(engine, "transfer_check_status")
        self._poller = Poller(engine)
        self._timeout_s = float(max(_MIN_TIMEOUT_S, math.ceil(timeout_s))) if timeout_s is not None else 30.0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._closed = False
        logger.info(
            "transport mooncake/%s ready, session %s, rdma nics %s, env %s",
            self.protocol,
            self._session,
            _topology_nics(engine) or "none",
            {k: v for k, v in env.items() if v is not None},
        )

    @property
    def session(self) -> str:
        return self._session

    def supports(self, device: str) -> bool:
        # the intra-node NVLink transport moves device memory only
        return self.protocol != "nvlink_intra" or device.startswith("cuda")

    def _fail(self, message: str, **details: Any) -> TransferError:
        return TransferError(message, session=self._session, protocol=self.protocol, **details)

    def register(self, address: int, length: int) -> None:
        with self._lock:
            self._check_open()
            if not self._regs.add(address, length):
                return
            try:
                rc = self._engine.register_memory(address, length)
            except Exception as exc:
                self._regs.remove(address)
                raise self._fail(f"register {length} bytes at {address:#x} failed: {exc}") from exc
            if rc != 0:
                self._regs.remove(address)
                raise self._fail(
                    f"register {length} bytes at {address:#x} on {self._session} failed, rc {rc}",
                    rc=rc,
                    address=address,
                    nbytes=length,
                )
        logger.debug("registered %s bytes at %#x on %s", length, address, self._session)

    def unregister(self, address: int) -> None:
        with self._lock:
            self._check_open()
            seg = self._regs.remove(address)
            if seg is None:
                return
            try:
                rc = self._engine.unregister_memory(address)
            except Exception as exc:
                raise self._fail(f"unregister {address:#x} failed: {exc}") from exc
        if rc != 0:
            raise self._fail(f"unregister {address:#x} on {self._session} failed, rc {rc}", rc=rc, address=address)
        logger.debug("unregistered %s bytes at %#x on %s", seg.length, address, self._session)

    def read(self, session: str, entries: Batch | Sequence[Entry]) -> None:
        self._transfer("read", session, entries)

    def write(self, session: str, entries: Batch | Sequence[Entry]) -> None:
        self._transfer("write", session, entries)

    def _check_open(self) -> None:
        if self._closed:
            raise self._fail(f"transport {self._session} is closed")

    def _transfer(self, op: str, session: str, entries: Batch | Sequence[Entry]) -> None:
        if not isinstance(session, str) or not session:
            raise InvalidArgument("session must be a non-empty 'host:port' string", session=session)
        with self._lock:
            batch = coalesce(entries, self._regs)
        if not len(batch):
            return
        nbytes = batch.nbytes
        route = f"from {session} to {self._session}" if op == "read" else f"from {self._session} to {session}"
        what = f"mooncake {op} of {nbytes} bytes in {len(batch)} entries {route}"
        with self._lock:
            self._check_open()
            self._regs.check(batch, side="local", peer=session)
            self._in_flight += 1
        start = time.monotonic()
        try:
            for attempt in range(2):
                with self._moving() as (engine, generation):
                    rc = self._run(engine, op, session, batch, start)
                if rc == 0 or self._mover is None or attempt:
                    break
                self._mover.renew(generation)  # its description of the peer may be stale
        except Exception as exc:
            raise self._fail(f"{what} failed: {exc}", peer=session, nbytes=nbytes) from exc
        finally:
            with self._lock:
                self._in_flight -= 1
                self._idle.notify_all()
        seconds = time.monotonic() - start
        if rc != 0:
            raise self._fail(
                f"{what} failed after {seconds:.3f} s, rc {rc}",
                peer=session,
                nbytes=nbytes,
                entries=len(batch),
                rc=rc,
            )
        logger.debug(
            "%s %s bytes in %s entries with %s: %.4f s, %.2f GB/s",
            op,
            nbytes,
            len(batch),
            session,
            seconds,
            nbytes / seconds / 1e9 if seconds > 0 else math.inf,
        )

    @contextlib.contextmanager
    def _moving(self) -> Iterator[tuple[Any, int]]:
        """The engine that moves bytes: the mover over nvlink_intra, else this one."""
        if self._mover is None:
            yield self._engine, 0
        else:
            with self._mover.use() as used:
                yield used

    def _run(self, engine: Any, op: str, session: str, batch: Batch, start: float) -> int:
        """The batch's native calls; 0 or the failing call's rc."""
        local, remote, length = batch.local.tolist(), batch.remote.tolist(), batch.length.tolist()
        if self._polled and len(batch) <= _POLLED:
            return self._polled_transfer(op, session, local, remote, length, start)
        call = engine.batch_transfer_sync_read if op == "read" else engine.batch_transfer_sync_write
        step = self.max_batch_entries
        rc = 0
        for i in range(0, len(batch), step):  # one native call unless the batch is very long
            rc = call(session, local[i : i + step], remote[i : i + step], length[i : i + step])
            if rc != 0:
                break
        return rc

    def _polled_transfer(
        self, op: str, session: str, local: list[int], remote: list[int], length: list[int], start: float
    ) -> int:
        """One asynchronous transfer per entry, waited for by this engine's poller; 0 or a
        failure's rc. Every transfer submitted is waited for before this returns (their bytes
        are landing)."""
        submit = self._engine.batch_transfer_async_read if op == "read" else self._engine.batch_transfer_async_write
        ids = []
        rc = 0
        for a, b, n in zip(local, remote, length, strict=True):
            batch_id = submit(session, [a], [b], [n])
            if not batch_id:
                rc = -1
                break
            ids.append(batch_id)
        if not ids:
            return rc
        deadline = start + self._timeout_s + sum(length) * 1e-9
        waiter = Wait(len(ids), deadline)
        self._poller.add(ids, waiter)
        waiter.done.wait()
        if waiter.timed_out:
            logger.warning("%d transfers with %s still pending after %.1f s", waiter.left, session, self._timeout_s)
        return rc or waiter.rc

    def close(self) -> None:
        """Refuse new transfers, wait for those in flight, unregister everything, stop the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while self._in_flight:
                self._idle.wait()
            for seg in self._regs:
                self._regs.remove(seg.address)
                try:
                    rc = self._engine.unregister_memory(seg.address)
                except Exception:  # teardown logs instead of raising
                    logger.warning("unregister %#x on %s raised", seg.address, self._session, exc_info=True)
                    continue
                if rc != 0:
                    logger.warning("unregister %#x on %s failed, rc %s", seg.address, self._session, rc)
            engine, self._engine = self._engine, None
        if self._mover is not None:
            self._mover.close()
        del engine  # the native destructor closes segments and stops the listeners (about 1 s)
        logger.info("transport mooncake/%s closed, session %s", self.protocol, self._session)
