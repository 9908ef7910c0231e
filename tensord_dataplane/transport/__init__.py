"""Transports move bulk bytes between registered memory of engines (see ``base``).

``memory`` is the in-process reference; ``mooncake`` is the cross-node one (its package is
optional and imported only when a ``MooncakeTransport`` starts). ``for_protocol`` is the one
place that maps a protocol name to a transport: the daemon and the SDK both start theirs
through it, so a new transport is added here (and to ``PROTOCOLS``), nowhere else.
"""

from collections.abc import Sequence

from .base import Batch, Entry, Segment, Transport, coalesce
from .memory import MemoryTransport
from .mooncake import PROTOCOLS as MOONCAKE_PROTOCOLS
from .mooncake import MooncakeTransport

#: Every protocol name a daemon or a client may ask for ("auto": the best Mooncake one here).
PROTOCOLS = MOONCAKE_PROTOCOLS


def for_protocol(protocol: str, hostname: str, nics: Sequence[str] | None = None) -> Transport:
    """Start this process's transport for `protocol`, advertising `hostname` to peers."""
    return MooncakeTransport(hostname, protocol, list(nics) if nics else None)


__all__ = [
    "PROTOCOLS",
    "Batch",
    "Entry",
    "MemoryTransport",
    "MooncakeTransport",
    "Segment",
    "Transport",
    "coalesce",
    "for_protocol",
]
