"""Transports move bulk bytes between registered memory of engines (see ``base``).

``memory`` is the in-process reference; ``mooncake`` is the cross-node one (its package is
optional and imported only when a ``MooncakeTransport`` starts).
"""

from .base import Entry, Segment, Transport, coalesce
from .memory import MemoryTransport
from .mooncake import MooncakeTransport

__all__ = ["Entry", "MemoryTransport", "MooncakeTransport", "Segment", "Transport", "coalesce"]
