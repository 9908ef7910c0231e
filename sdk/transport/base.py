"""The transport interface: move bytes between registered memory of two engines.

A transport is identified on the network by its ``session`` (for Mooncake, ``"host:port"``).
Memory is registered once (at slab allocation) and then read or written by peers in batches of
``Entry`` descriptors: one native call per batch.

Batches are **not** all-or-nothing: when ``read``/``write`` raises ``TransferError`` the
destination ranges hold undefined bytes. Callers retry another replica or discard the target.
``unregister`` is idempotent. Every failure to move bytes is an ``sdk.errors.TransferError``;
a malformed descriptor is an ``InvalidArgument``.
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

from sdk.errors import InvalidArgument, TransferError

__all__ = ["Entry", "Registrations", "Segment", "Transport", "coalesce", "total_bytes"]

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


def coalesce(entries: Iterable[Entry]) -> list[Entry]:
    """Merge entries that are contiguous on both sides; drop empty ones.

    Entries are sorted by local address first, so the result does not depend on input order.
    """
    out: list[Entry] = []
    for e in sorted((e for e in entries if e.length), key=lambda e: (e.local_address, e.remote_address)):
        if out:
            last = out[-1]
            if (
                last.local_address + last.length == e.local_address
                and last.remote_address + last.length == e.remote_address
            ):
                out[-1] = Entry(last.local_address, last.remote_address, last.length + e.length)
                continue
        out.append(e)
    return out


def total_bytes(entries: Iterable[Entry]) -> int:
    return sum(e.length for e in entries)


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

    def check(self, entries: Sequence[Entry], *, side: str, peer: str) -> None:
        """Raise TransferError unless every entry's ``side`` range lies in one registration."""
        for e in entries:
            address = e.local_address if side == "local" else e.remote_address
            if self.find(address, e.length) is None:
                raise TransferError(
                    f"{side} range {address:#x}+{e.length} bytes is not inside memory registered on"
                    f" {self.session} (transfer with {peer})",
                    session=self.session,
                    peer=peer,
                    address=address,
                    nbytes=e.length,
                )


class Transport(abc.ABC):
    """One engine: registered memory here, batched one-sided reads and writes to peers.

    A context manager; after ``close`` every method but ``close`` raises TransferError.
    """

    name: str = "transport"
    protocol: str = ""

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
    def read(self, session: str, entries: Sequence[Entry]) -> None:
        """Copy remote → local for every entry, in one batch; blocks until done or failed."""

    @abc.abstractmethod
    def write(self, session: str, entries: Sequence[Entry]) -> None:
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
