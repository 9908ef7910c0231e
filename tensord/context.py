"""This node's collaborators as the ops and the fleet use them, handed to each (built once in
`tensord/daemon.py`) rather than reached through `Store`: the node's name, the registry, the
metrics, and the Transfer Engine (`transport`, set once the daemon has started it; the
registrations of slabs with it are `Registrations`', which the store drives)."""

from __future__ import annotations

from dataclasses import dataclass

from tensord.metrics import Metrics
from tensord.registrations import Registrations
from tensord.registry.base import Registry
from tensord_dataplane.transport.base import Transport


@dataclass(eq=False)
class NodeContext:
    node: str
    registry: Registry
    metrics: Metrics
    registrations: Registrations

    @property
    def transport(self) -> Transport | None:
        """This node's Transfer Engine; None when it has none (or before the daemon started it)."""
        return self.registrations.transport
