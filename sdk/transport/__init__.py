"""Transports move bulk bytes between registered memory of engines (see ``base``).

``memory`` is the in-process reference; ``mooncake`` is the cross-node one (its package is
optional and imported only when a ``MooncakeTransport`` starts).
"""

from .base import Batch, Entry, Segment, Transport, coalesce
from .memory import MemoryTransport
from .mooncake import MooncakeTransport

__all__ = ["Batch", "Entry", "MemoryTransport", "MooncakeTransport", "Segment", "Transport", "coalesce"]
