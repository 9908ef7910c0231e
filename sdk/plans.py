"""Copy plans: what a `load_into` or a `put` of the same tensors works out once, reused.

Trainers put the same tensors every step; engines load the same parameters. A plan holds what
the first call worked out: which rows of the set each tensor is, the checks of names, dtypes
and shapes against the set, and the pointer tables of the copies (read-only arrays, so the
copy engine keeps their prepared, uploaded form: `tensord_dataplane.copy.copy_table`).

A plan is used again only while it is exactly what would be made afresh: the same names in
the same order, tensors that the `Snapshot` it was made from still holds (data pointers,
shapes, strides, dtypes, devices: `tensord_dataplane.snapshot`) and, for a load, a set whose
layout (names, dtypes, shapes, offsets) equals the one it was checked against. Anything else
makes a new plan. Plans hold no tensor, only numbers: a plan never keeps memory alive, and a
stale one is never run. Each client keeps a few, by set name; they are immutable, so threads
share them.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from sdk.checks import same_ties
from tensord_contract.manifest import Manifest, Table
from tensord_dataplane.slab import SlabAccess
from tensord_dataplane.snapshot import Snapshot
from tensord_dataplane.tensors import Described

_KEPT = 16  # plans a client keeps


def frozen(a: np.ndarray) -> np.ndarray:
    """`a` as a read-only array of its own (the copy engine may then keep its prepared form)."""
    out = np.array(a, dtype=np.int64, copy=True)
    out.flags.writeable = False
    return out


def same_layout(a: Manifest, b: Manifest) -> bool:
    """The two versions place the same tensors alike (names, dtypes, shapes, offsets)."""
    if a is b:
        return True
    ta, tb = a.table, b.table
    if ta is tb:  # a version decoded with the table of the one before (`sdk.replicas`)
        return np.array_equal(a.offsets, b.offsets)
    return (
        len(ta) == len(tb)
        and np.array_equal(a.offsets, b.offsets)
        and np.array_equal(ta.dtypes, tb.dtypes)
        and np.array_equal(ta.ndims, tb.ndims)
        and np.array_equal(ta.dims, tb.dims)
        and ta.names == tb.names
    )


@dataclass(frozen=True, eq=False)
class Copies:
    """One table of copies per device: (device, tensor pointers, slab offsets, sizes)."""

    tables: list[tuple[torch.device, np.ndarray, np.ndarray, np.ndarray]]

    @classmethod
    def of(cls, d: Described, rows: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> Copies:
        """From described tensors (their rows `rows` of `d`) and their places in the slab."""
        return cls(
            [
                (dev, frozen(d.ptrs[sel]), frozen(offsets[sel]), frozen(sizes[sel]))
                for dev, sel in d.by_device(rows).items()
            ]
        )

    def single(self, count: int) -> tuple[torch.device, np.ndarray, np.ndarray] | None:
        """(device, pointers, sizes) of all `count` tensors, where they form one table."""
        if len(self.tables) != 1 or len(self.tables[0][1]) != count:
            return None
        dev, ptrs, _, sizes = self.tables[0]
        return dev, ptrs, sizes

    def read(self, slab: SlabAccess) -> None:
        for dev, ptrs, offsets, sizes in self.tables:
            slab.read_into(ptrs, offsets, sizes, dev)

    def write(self, slab: SlabAccess) -> None:
        for dev, ptrs, offsets, sizes in self.tables:
            slab.write_from(ptrs, offsets, sizes, dev)


@dataclass(frozen=True, eq=False)
class LoadPlan:
    """A `load_into` of `keys` (the target's names, in order) from sets laid out as `manifest`:
    `picked` are the indices of the keys the set holds, `rows` their rows."""

    keys: list[str]
    strict: bool
    snapshot: Snapshot | None
    manifest: Manifest
    picked: np.ndarray
    rows: np.ndarray
    copies: Copies
    tied: np.ndarray  # (i, j): targets sharing memory, only i copied (`sdk.checks.distinct_targets`)

    def fits(self, keys: list[str], strict: bool, values: list[torch.Tensor], manifest: Manifest) -> bool:
        return (
            strict == self.strict
            and self.snapshot is not None
            and keys == self.keys
            and same_layout(self.manifest, manifest)
            and same_ties(manifest, self.rows, self.tied)  # a new version may hold tied rows apart
            and self.snapshot.holds(values)
        )


@dataclass(frozen=True, eq=False)
class PutPlan:
    """A `put` of `names` (in order) to a slab on `device`: the table sent, and the copies into
    the slab for the offsets of the last reservation (`written`), kept while they recur."""

    names: list[str]
    snapshot: Snapshot | None  # None: never used again
    device: str
    table: Table
    described: Described
    written: list[tuple[np.ndarray, Copies]]  # [(offsets, copies)]: the last one, replaced under a lock

    def fits(self, names: list[str], values: list[torch.Tensor], device: str | None) -> bool:
        if self.snapshot is None or not (device is None or device == self.device):
            return False
        return names == self.names and self.snapshot.holds(values)

    def copies(self, offsets: np.ndarray, lock: threading.Lock) -> Copies:
        with lock:
            last = self.written[0] if self.written else None
        if last is not None and np.array_equal(last[0], offsets):
            return last[1]
        made = Copies.of(self.described, np.arange(len(self.names)), offsets, self.table.sizes)
        with lock:
            self.written[:] = [(frozen(offsets), made)]
        return made


class Plans:
    """A client's plans by (kind, set name), the most recent few."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._plans: collections.OrderedDict[tuple[str, str], LoadPlan | PutPlan] = collections.OrderedDict()

    def get(self, kind: str, name: str) -> LoadPlan | PutPlan | None:
        with self.lock:
            return self._plans.get((kind, name))

    def keep(self, kind: str, name: str, plan: LoadPlan | PutPlan) -> None:
        with self.lock:
            self._plans[(kind, name)] = plan
            self._plans.move_to_end((kind, name))
            while len(self._plans) > _KEPT:
                self._plans.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self._plans.clear()


def keys_and_values(tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """A mapping's keys and values, in one pass each."""
    from tensord_contract.bulk import paused_gc

    with paused_gc():
        return list(tensors), list(tensors.values())
