"""The transport interface: move bytes between registered memory of two engines.

A transport is identified on the network by its ``session`` (for Mooncake, ``"host:port"``).
Memory is registered once (at slab allocation) and then read or written by peers in batches of
copies (a ``Batch`` of address arrays, or ``Entry`` objects): one native call per batch.
Entries contiguous on both sides are merged, never across a local registration boundary; a
batch's remote ranges are assumed to lie in one registration of the peer (a replica's slab).

Batches are **not** all-or-nothing: when ``read``/``write`` raises ``TransferError`` the
destination ranges hold undefined bytes. Callers retry another replica or discard the target.
``unregister`` is idempotent. Every failure to move bytes is an ``tensord_contract.errors.TransferError``;
a malformed descriptor is an ``InvalidArgument``.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import numpy as np

from tensord_contract.errors import InvalidArgument, TransferError
from tensord_dataplane.env import env_int

__all__ = [
    "Batch",
    "Entry",
    "Registrations",
    "Segment",
    "Transport",
    "advertised_ranges",
    "coalesce",
    "total_bytes",
]


def advertised_ranges() -> int:
    """Registered ranges one engine may advertise (TENSORD_ENGINE_BUFFERS, default 2,048): a
    reader fetches an engine's list in one handshake message, which Mooncake caps at 1 MiB
    (about 4,000 GPU allocations with their IPC handles); past it every reader's handshake
    with that engine fails."""
    return env_int("TENSORD_ENGINE_BUFFERS", 2048, 1, 1 << 20)


_T = TypeVar("_T", bound="Transport")


def _check_range(what: str, address: int, length: int) -> None:
    if not isinstance(address, int) or not isinstance(length, int):
        raise InvalidArgument(f"{what}: address and length must be int", address=address, length=length)
    if address < 0 or length < 0:
        raise InvalidArgument(f"{what}: negative address or length", address=address, length=length)


@dataclass(frozen=True)
class Segment:
    """A registered range of memory, here (``session`` is ours) or on a peer."""

    session: str
    address: int
    length: int

    def __post_init__(self) -> None:
        _check_range("segment", self.address, self.length)

    @property
    def end(self) -> int:
        return self.address + self.length

    def contains(self, address: int, length: int) -> bool:
        return self.address <= address and address + length <= self.end


@dataclass(frozen=True)
class Entry:
    """One contiguous copy in a batch: ``length`` bytes between a local and a remote address."""

    local_address: int
    remote_address: int
    length: int

    def __post_init__(self) -> None:
        _check_range("entry", self.local_address, self.length)
        _check_range("entry", self.remote_address, self.length)


@dataclass(frozen=True)
class Batch:
    """Many copies as three equal-length int64 arrays: local address, remote address, bytes.
    `fence` (optional, one label per entry): entries of different labels are never merged (the
    remote side's registrations, where it has many: a merged entry must lie in one)."""

    local: np.ndarray
    remote: np.ndarray
    length: np.ndarray
    fence: np.ndarray | None = None

    @classmethod
    def of(cls, entries: Batch | Iterable[Entry]) -> Batch:
        """A batch from a Batch or from Entry objects; empty copies dropped; checked."""
        fence = None
        if isinstance(entries, Batch):
            local, remote, length = (
                np.asarray(a, dtype=np.int64).reshape(-1) for a in (entries.local, entries.remote, entries.length)
            )
            if entries.fence is not None:
                fence = np.asarray(entries.fence, dtype=np.int64).reshape(-1)
                if len(fence) != len(local):
                    raise InvalidArgument("a batch's fence needs one label per entry")
        else:
            rows = [(e.local_address, e.remote_address, e.length) for e in entries]
            arr = np.array(rows, dtype=np.int64).reshape(-1, 3)
            local, remote, length = arr[:, 0], arr[:, 1], arr[:, 2]
        if not len(local) == len(remote) == len(length):
            raise InvalidArgument("a batch needs as many local and remote addresses as lengths")
        if len(local) and (int(local.min()) < 0 or int(remote.min()) < 0 or int(length.min()) < 0):
            raise InvalidArgument("entry: negative address or length")
        keep = length > 0
        return cls(local[keep], remote[keep], length[keep], None if fence is None else fence[keep])

    def __len__(self) -> int:
        return len(self.length)

    @property
    def nbytes(self) -> int:
        return int(self.length.sum())

    def entries(self) -> list[Entry]:
        return [
            Entry(a, b, n)
            for a, b, n in zip(self.local.tolist(), self.remote.tolist(), self.length.tolist(), strict=True)
        ]


def coalesce(entries: Batch | Iterable[Entry], registrations: Registrations | None = None) -> Batch:
    """Merge entries contiguous on both sides; drop empty ones. With `registrations` (the local
    side's), a merge never crosses a registration boundary (a merged range must lie in one);
    nor does it cross the batch's `fence` (the remote side's).

    Entries are sorted by local address first, so the result does not depend on input order.
    """
    batch = Batch.of(entries)
    if len(batch) < 2:
        return batch
    order = np.lexsort((batch.remote, batch.local))
    local, remote, length = batch.local[order], batch.remote[order], batch.length[order]
    join = (local[1:] == local[:-1] + length[:-1]) & (remote[1:] == remote[:-1] + length[:-1])
    if registrations is not None and join.any():
        join &= registrations.segment_of(local[1:]) == registrations.segment_of(local[:-1])
    if batch.fence is not None and join.any():
        fence = batch.fence[order]
        join &= fence[1:] == fence[:-1]
    start = np.ones(len(local), dtype=bool)
    start[1:] = ~join
    first = np.flatnonzero(start)
    return Batch(local[first], remote[first], np.add.reduceat(length, first))


def total_bytes(entries: Batch | Iterable[Entry]) -> int:
    return Batch.of(entries).nbytes


class Registrations:
    """Non-overlapping registered ranges of one engine, looked up by address (not thread-safe)."""

    def __init__(self, session: str = "") -> None:
        self.session = session
        self._starts: list[int] = []
        self._segments: list[Segment] = []

    def __len__(self) -> int:
        return len(self._segments)

    def __iter__(self) -> Iterator[Segment]:
        return iter(list(self._segments))

    def _index_at_or_before(self, address: int) -> int:
        return bisect.bisect_right(self._starts, address) - 1

    def add(self, address: int, length: int) -> bool:
        """Remember a range; False when exactly this range is already there (a no-op)."""
        _check_range("register", address, length)
        if length == 0:
            raise InvalidArgument("register: empty range", address=address)
        i = self._index_at_or_before(address)
        if i >= 0 and self._segments[i].address == address and self._segments[i].length == length:
            return False
        below = self._segments[i] if i >= 0 else None
        above = self._segments[i + 1] if i + 1 < len(self._segments) else None
        if (below is not None and below.end > address) or (above is not None and above.address < address + length):
            raise InvalidArgument("register: range overlaps a registered range", address=address, length=length)
        self._starts.insert(i + 1, address)
        self._segments.insert(i + 1, Segment(self.session, address, length))
        return True

    def remove(self, address: int) -> Segment | None:
        """Forget the range that starts at ``address``; None when there is none."""
        i = self._index_at_or_before(address)
        if i < 0 or self._segments[i].address != address:
            return None
        del self._starts[i]
        return self._segments.pop(i)

    def find(self, address: int, length: int) -> Segment | None:
        """The registered range holding all of ``[address, address + length)``, if any."""
        i = self._index_at_or_before(address)
        if i >= 0 and self._segments[i].contains(address, length):
            return self._segments[i]
        return None

    def segment_of(self, addresses: np.ndarray) -> np.ndarray:
        """For each address, the index of the registration starting at or before it (-1: none)."""
        return np.searchsorted(np.array(self._starts, dtype=np.int64), addresses, side="right") - 1

    def check(self, batch: Batch, *, side: str, peer: str) -> None:
        """Raise TransferError unless every entry's ``side`` range lies in one registration."""
        address = batch.local if side == "local" else batch.remote
        seg = self.segment_of(address)
        ends = np.array([s.end for s in self._segments] + [0], dtype=np.int64)
        bad = (seg < 0) | (address + batch.length > ends[seg])
        if bad.any():
            i = int(np.argmax(bad))
            at, n = int(address[i]), int(batch.length[i])
            raise TransferError(
                f"{side} range {at:#x}+{n} bytes is not inside memory registered on"
                f" {self.session} (transfer with {peer})",
                session=self.session,
                peer=peer,
                address=at,
                nbytes=n,
            )


class Transport(abc.ABC):
    """One engine: registered memory here, batched one-sided reads and writes to peers.

    A context manager; after ``close`` every method but ``close`` raises TransferError.
    """

    name: str = "transport"
    protocol: str = ""
    #: bytes whose moving costs about what one entry costs besides its bytes: reads of many
    #: pieces smaller than this go through a staging buffer in spans (`tensord_dataplane.spans`)
    entry_bytes: int = 0

    @property
    @abc.abstractmethod
    def session(self) -> str:
        """This engine's session id, what peers pass to ``read``/``write``."""

    def supports(self, device: str) -> bool:
        """Whether memory on `device` ("cpu", "cuda:N") can be registered with this engine."""
        return True

    def describe(self) -> dict[str, str]:
        """What a client on the same node needs to start a compatible engine."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "session": self.session,
            "hostname": self.session.rpartition(":")[0],
        }

    @abc.abstractmethod
    def register(self, address: int, length: int) -> None:
        """Make ``[address, address + length)`` readable and writable by peers.

        Registering exactly the same range again is a no-op; an overlapping one is InvalidArgument.
        """

    @abc.abstractmethod
    def unregister(self, address: int) -> None:
        """Withdraw the range registered at ``address``; unknown addresses are ignored."""

    @abc.abstractmethod
    def read(self, session: str, entries: Batch | Sequence[Entry]) -> None:
        """Copy remote → local for every entry, in one batch; blocks until done or failed."""

    @abc.abstractmethod
    def write(self, session: str, entries: Batch | Sequence[Entry]) -> None:
        """Copy local → remote for every entry, in one batch; blocks until done or failed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unregister everything and release the engine; idempotent, logs instead of raising."""

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
