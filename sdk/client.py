"""The tensord client: put, get, mount, load_into over one daemon connection.

`Client` composes the halves, one module each: the catalogue and cluster ops (`sdk.catalogue`,
no torch), pins and manifests (`sdk.replicas`), reads (`sdk.reads`: get, mount, load_into, with
failover across replicas), writes (`sdk.writes`: put, reserve, commit) and publishing without
a copy (`sdk.publishing`: publish).

Every operation works on whole sets in bulk: a manifest is a few arrays (`tensord_contract.manifest`), a
read or write is one table of copies (`tensord_dataplane`), and the tensors a read returns are
views built on first use (`tensord_dataplane.views.TensorMap`). Manifests are cached by (name,
version, replica generation): reopening a version this client has seen transfers none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdk.publishing import Publication, Publishing
from sdk.reads import Mount, Reads
from sdk.writes import Reservation, Writes

if TYPE_CHECKING:
    from tensord_dataplane.transport import Transport

__all__ = ["Client", "Mount", "Publication", "Reservation"]


class Client(Reads, Writes, Publishing):
    """A connection to one tensord daemon. Thread-safe; a context manager; unusable after close.

    `socket`: path of the local daemon's Unix socket. `address`: "host:port" of a daemon's TCP
    listener, for a process on a node without a daemon. Default: $TENSORD_ADDR if set, else
    $TENSORD_SOCKET, else /run/tensord/tensord.sock. `token`: for listeners that require one
    (default: $TENSORD_TOKEN). `timeout`: seconds to wait for any one reply. `transport`: the
    transport to read and write other nodes' memory with (`tensord_dataplane.transport`; tests
    hand it the in-memory reference); default: a Transfer Engine of the daemon's protocol,
    started on first use. A transport handed in is its caller's: `close` leaves it open.
    Environment defaults are read in one place, `sdk.settings`.

    The catalogue and cluster ops (ls, info, delete, status, nodes, replicate, watch,
    load_checkpoint) come from `sdk.catalogue.CatalogueClient`; this class adds the data plane.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        timeout: float | None = 300.0,
        transport: Transport | None = None,
    ) -> None:
        super().__init__(socket, address=address, token=token, timeout=timeout)
        self._given = transport
