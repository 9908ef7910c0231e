"""A committed version (or a reservation): a `Table` placed in a slab, with its fingerprints,
and its wire form."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from tensord_contract.errors import InvalidArgument, ProtocolError, TensordError
from tensord_contract.manifest.columns import (
    ALIGN,
    DTYPE_CODES,
    FINGERPRINT_VERSION,
    FINGERPRINT_VERSIONS,
    LE_I64,
    LE_U64,
    MAX_BYTES,
    column,
)
from tensord_contract.manifest.table import Table, TensorSpec

TABLE_KEYS = frozenset({"count", "names", "dtypes", "ndims", "dims", "sizes"})  # what the table gives


class Manifest:
    """One committed version (or a reservation, version 0): a table placed in a slab.

    Rows are in the order of the put. `fingerprints` is None until commit; `fp_version` names
    the fingerprint definition they were made with (FINGERPRINT_VERSION for new ones; a version
    recorded under an older definition keeps it, and is checked under it). Immutable.
    """

    def __init__(
        self,
        name: str,
        version: int,
        table: Table,
        offsets: np.ndarray,
        nbytes: int,
        *,
        fingerprints: np.ndarray | None = None,
        created: float = 0.0,
        origin: str = "",
        fp_version: int = FINGERPRINT_VERSION,
        check: type[TensordError] | None = InvalidArgument,
    ) -> None:
        self.name, self.version, self.table, self.offsets, self.nbytes = name, version, table, offsets, nbytes
        self.fingerprints, self.created, self.origin = fingerprints, created, origin
        self.fp_version = fp_version
        if check is not None:
            self._check(check)

    def _check(self, error: type[TensordError], like: Manifest | None = None) -> None:
        """Every tensor aligned, inside the slab, not overlapping another; fingerprints fit.
        `like`: a manifest checked before; placed exactly alike, the places are not sorted again."""
        n, offsets, sizes = len(self.table), self.offsets, self.table.sizes
        if self.fp_version not in FINGERPRINT_VERSIONS:
            raise error(f"fingerprint definition {self.fp_version!r:.20} unknown (known: {FINGERPRINT_VERSIONS})")
        if type(self.nbytes) is not int or not 0 <= self.nbytes < MAX_BYTES:
            raise error(f"slab size {self.nbytes!r:.40} out of range")
        if offsets.shape != (n,) or (self.fingerprints is not None and self.fingerprints.shape != (n,)):
            raise error("one offset and one fingerprint per tensor")
        if not n or (like is not None and self.placed_like(like)):
            return
        if int(offsets.min()) < 0 or np.any(offsets % ALIGN):
            raise error("tensor offsets must be non-negative multiples of 256")
        ends = offsets + sizes
        if int(ends.max()) > self.nbytes:
            i = int(np.argmax(ends))
            raise error(f"tensor {self.table.names[i]!r:.80} ends at {int(ends[i])}, past the slab ({self.nbytes})")
        order = np.lexsort((sizes, offsets))
        overlap = offsets[order][1:] < ends[order][:-1]
        if overlap.any():
            i = int(order[1:][overlap][0])
            raise error(f"tensor {self.table.names[i]!r:.80} overlaps another")

    def placed_like(self, other: Manifest) -> bool:
        """The same table (the very object) at the same offsets in a slab of the same size."""
        return other.table is self.table and other.nbytes == self.nbytes and np.array_equal(other.offsets, self.offsets)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.wire == other.wire

    __hash__ = None  # type: ignore[assignment]

    # -- a mapping of name -> row ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.table)

    def __contains__(self, tensor_name: object) -> bool:
        return tensor_name in self.table.index

    def __getitem__(self, tensor_name: str) -> TensorSpec:
        return self.spec(self.table.index[tensor_name])

    @property
    def names(self) -> list[str]:
        return self.table.names

    @property
    def sizes(self) -> np.ndarray:
        return self.table.sizes

    def spec(self, i: int) -> TensorSpec:
        fp = None if self.fingerprints is None else int(self.fingerprints[i])
        t = self.table
        return TensorSpec(t.names[i], t.dtype_name(i), t.shape(i), int(self.offsets[i]), int(t.sizes[i]), fp)

    @property
    def tensors(self) -> Iterator[TensorSpec]:
        """Every row as a TensorSpec (one object per tensor: for cold paths only)."""
        return (self.spec(i) for i in range(len(self.table)))

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data, without alignment padding."""
        return int(self.table.sizes.sum())

    def rows(self) -> dict[str, dict[str, Any]]:
        """name -> {dtype, shape, nbytes}, for `info` when asked for every tensor."""
        t = self.table
        return {
            k: {"dtype": DTYPE_CODES[d], "shape": list(s), "nbytes": n}
            for k, d, s, n in zip(t.names, t.dtypes.tolist(), t.shapes, t.sizes.tolist(), strict=True)
        }

    def dtype_counts(self) -> dict[str, int]:
        counts = np.bincount(self.table.dtypes, minlength=len(DTYPE_CODES))
        return {DTYPE_CODES[i]: int(c) for i, c in enumerate(counts) if c}

    def committed(
        self, version: int, fingerprints: np.ndarray, created: float, fp_version: int = FINGERPRINT_VERSION
    ) -> Manifest:
        """This reservation's manifest as the committed `version`, its fingerprints made with
        definition `fp_version` (checked by the caller)."""
        return Manifest(
            self.name, version, self.table, self.offsets, self.nbytes,
            fingerprints=fingerprints, created=created, origin=self.origin, fp_version=fp_version, check=None,
        )  # fmt: skip

    # -- wire -----------------------------------------------------------------------------------
    @functools.cached_property
    def wire(self) -> dict[str, Any]:
        """The wire form, computed once (a manifest never changes)."""
        return {
            **self.table.to_wire(),
            "name": self.name,
            "version": self.version,
            "nbytes": self.nbytes,
            "created": self.created,
            "origin": self.origin,
            "offsets": self.offsets.astype(LE_I64, copy=False).tobytes(),
            "sizes": self.table.sizes.astype(LE_I64, copy=False).tobytes(),
            "fingerprints": None if self.fingerprints is None else self.fingerprints.astype(LE_U64).tobytes(),
            "fp": self.fp_version,
        }

    def to_wire(self) -> dict[str, Any]:
        return self.wire

    @functools.cached_property
    def placing_wire(self) -> dict[str, Any]:
        """The wire form without the table's columns (nor sizes, which the table gives): for a
        reader that has the table from another version (`OpenReply.table_of`)."""
        return {k: v for k, v in self.wire.items() if k not in TABLE_KEYS}

    @classmethod
    def from_wire(
        cls,
        data: Any,
        error: type[TensordError] = ProtocolError,
        known: Table | None = None,
        *,
        table: Table | None = None,
        like: Manifest | None = None,
    ) -> Manifest:
        """Decode and validate a manifest; anything inconsistent raises `error` (ProtocolError:
        a manifest comes from a daemon or the registry, never from a user). `known`: a table
        decoded before (another version's), used as it is where the wire carries the same one.
        `table`: the table of a wire that carries none (`placing_wire`); `like`: a manifest
        checked before (one placed alike needs no sort of its places)."""
        if not isinstance(data, dict):
            raise error("manifest must be a map")
        placing = table is not None
        if table is None:
            table = Table.from_wire(data, error, known)
        name, version, nbytes = data.get("name"), data.get("version"), data.get("nbytes")
        if type(name) is not str or type(version) is not int or version < 0:
            raise error("manifest name and version must be a string and a non-negative int")
        created, origin = data.get("created", 0.0), data.get("origin", "")
        if not isinstance(created, (int, float)) or isinstance(created, bool) or not isinstance(origin, str):
            raise error("manifest created/origin have wrong types")
        n = len(table)
        offsets = column(data, "offsets", LE_I64, n, error).astype(np.int64)
        sizes = table.sizes if placing else column(data, "sizes", LE_I64, n, error)
        if not np.array_equal(sizes, table.sizes):
            i = int(np.argmax(sizes != table.sizes))
            raise error(f"tensor {table.names[i]!r:.80}: byte size disagrees with its dtype and shape")
        fps, fp_version = None, data.get("fp", FINGERPRINT_VERSION)
        if type(fp_version) is not int or fp_version not in FINGERPRINT_VERSIONS:
            raise error(f"fingerprint definition {fp_version!r:.20} unknown (known: {FINGERPRINT_VERSIONS})")
        if data.get("fingerprints") is not None:
            fps = column(data, "fingerprints", LE_U64, n, error).astype(np.uint64)
        if type(nbytes) is not int:
            raise error("manifest nbytes must be an int")
        manifest = cls(
            name, version, table, offsets, nbytes, fingerprints=fps, created=float(created), origin=origin,
            fp_version=fp_version, check=None,
        )  # fmt: skip
        manifest._check(error, like)
        return manifest
