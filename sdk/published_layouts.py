"""What publishing the same memory again needs again: the table, where each tensor lies in
which allocation, the allocations' IPC handles (`Client.publish`).

An RL engine publishes its parameters after every update: the same tensors, the same
allocations, new bytes. Describing 90k tensors, asking the driver for every allocation's range
and exporting an IPC handle for each cost far more than the publication itself, so the last
layout of each set name is kept and used again while it is exactly what describing afresh
would give: the same names in order, tensors its `Snapshot` still holds (every data pointer,
shape, stride and dtype) and, on a GPU, the same allocations (the driver's buffer ids: an
allocation freed and made anew at the same address has a new one, and a new IPC handle).
A layout holds numbers and names, never tensors. Fingerprints are always computed afresh.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensord_contract.descriptors import PublishedIpcReplica
from tensord_contract.errors import InvalidArgument, TransferError
from tensord_contract.manifest import Table
from tensord_dataplane.snapshot import Snapshot
from tensord_dataplane.sources import Places, places
from tensord_dataplane.tensors import describe

_KEPT = 8  # set names whose last layout is kept


@dataclass(frozen=True)
class Layout:
    names: list[str]
    snapshot: Snapshot | None
    table: Table
    ptrs: np.ndarray  # int64, the tensors' data pointers
    sizes: np.ndarray  # int64, their bytes
    where: Places
    ids: tuple[int, ...]  # the allocations' buffer ids (GPU), in `where.bases` order
    ipc: PublishedIpcReplica | None  # GPU: the allocations exported for this node's readers

    def fits(self, names: list[str], values: list[torch.Tensor]) -> bool:
        if self.snapshot is None or names != self.names or not self.snapshot.holds(values):
            return False
        if not self.where.device.startswith("cuda"):
            return True
        try:
            return tuple(_ids(self.where)) == self.ids
        except TransferError:  # an allocation is gone
            return False


class Layouts:
    """The last layout published under each set name (a few names), for one client."""

    def __init__(self) -> None:
        self._kept: dict[str, Layout] = {}
        self._lock = threading.Lock()

    def find(self, name: str, names: list[Any], values: list[torch.Tensor]) -> tuple[Layout, bool]:
        """The layout of `values` published as `name`, and whether it is the one kept from the
        last publication of `name` (still fitting), else described afresh (InvalidArgument for
        keys that are not str, or what cannot be published without a copy)."""
        with self._lock:
            kept = self._kept.get(name)
        if kept is not None and kept.fits(names, values):
            return kept, True
        if not all(isinstance(k, str) for k in names):
            raise InvalidArgument("tensors must be keyed by name (str)")
        layout = _described(names, values, Snapshot.take(values))
        with self._lock:
            self._kept.pop(name, None)
            self._kept[name] = layout
            while len(self._kept) > _KEPT:
                del self._kept[next(iter(self._kept))]
        return layout, False


def _described(names: list[str], values: list[torch.Tensor], snapshot: Snapshot | None) -> Layout:
    from tensord_dataplane.published_ipc import export

    d = describe(values, copy_sparse=False, known=snapshot)
    where = places(d, names)
    on_gpu = where.device.startswith("cuda")
    ids = tuple(_ids(where)) if on_gpu else ()
    ipc = export(where) if on_gpu else None
    table = Table.of_columns(names, d.dtypes, d.ndims, d.dims)
    return Layout(list(names), snapshot, table, d.ptrs, d.sizes, where, ids, ipc)


def _ids(where: Places) -> list[int]:
    from tensord_dataplane.cuda import buffer_ids

    return buffer_ids(where.bases.tolist(), where.device)
