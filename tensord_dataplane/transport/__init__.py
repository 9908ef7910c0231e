"""Transports move bulk bytes between registered memory of engines (see ``base``).

``memory`` is the in-process reference; ``mooncake`` is the cross-node one (its package is
optional and imported only when a ``MooncakeTransport`` starts). ``TRANSPORTS`` is the one table
from a protocol name to the transport that speaks it: the daemon and the SDK both start theirs
through `for_protocol`, and the daemon's config is checked against it, so a new transport is a
row here, nowhere else.

Not a transport: NCCL/gloo pair groups (``tensord.fleet.pairs``). They are two-sided (both
processes run a collective; the source GPU runs kernels) and move chunks only between daemons
during a replicate, so they sit in the fleet, outside this interface; `transport.protocol =
"nccl"` in the daemon's config means "move replicas over pair groups only".
"""

from collections.abc import Callable, Sequence

from .base import Batch, Entry, Segment, Transport, coalesce
from .memory import MemoryTransport
from .mooncake import PROTOCOLS as MOONCAKE_PROTOCOLS
from .mooncake import MooncakeTransport


def _mooncake(protocol: str) -> Callable[[str, list[str] | None], Transport]:
    return lambda hostname, nics: MooncakeTransport(hostname, protocol, nics)


#: protocol -> how to start this process's transport for it (hostname advertised to peers, NICs)
TRANSPORTS: dict[str, Callable[[str, list[str] | None], Transport]] = {
    protocol: _mooncake(protocol) for protocol in MOONCAKE_PROTOCOLS
}
#: Every protocol name a daemon or a client may ask for ("auto": the best Mooncake one here).
PROTOCOLS = tuple(TRANSPORTS)


def for_protocol(protocol: str, hostname: str, nics: Sequence[str] | None = None) -> Transport:
    """Start this process's transport for `protocol`, advertising `hostname` to peers."""
    from tensord_contract.errors import InvalidArgument

    start = TRANSPORTS.get(protocol)
    if start is None:
        raise InvalidArgument(f"unknown transport protocol {protocol!r}", protocol=protocol, allowed=PROTOCOLS)
    return start(hostname, list(nics) if nics else None)


__all__ = [
    "PROTOCOLS",
    "TRANSPORTS",
    "Batch",
    "Entry",
    "MemoryTransport",
    "MooncakeTransport",
    "Segment",
    "Transport",
    "coalesce",
    "for_protocol",
]
