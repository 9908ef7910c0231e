"""Tensors of one buffer, built when first used: what `get` returns and what `mount` exposes.

A set of 90,000 tensors would cost ~0.1-1 s to turn into 90,000 Python tensors up front (1-10
us each), while the bytes themselves move in milliseconds. A `TensorMap` holds one flat buffer
and the manifest's columns, and builds a tensor view the first time a name is looked up
(`as_strided` on a typed view of the buffer, with the collector paused for bulk iteration).
It behaves as a ``dict[str, Tensor]``: ``len``, ``in``, iteration over names in set order,
``items()``, ``values()``, ``m[name]``; assigning or deleting a name turns it into a plain
dict of every view first.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np
import torch

from tensord_contract.bulk import paused_gc
from tensord_contract.manifest import DTYPE_CODES, Manifest
from tensord_dataplane.fingerprint import fingerprints, slab_fingerprints
from tensord_dataplane.tensors import DTYPES, contiguous_strides


class TensorMap(MutableMapping[str, torch.Tensor]):
    """name -> tensor view of `base` (a flat uint8 tensor), for rows `rows` of `manifest` (all
    rows when None) placed at byte `offsets` of `base`. With `blocks`, tensor i lies in
    ``blocks[block[i]]`` instead (a publisher's allocations)."""

    def __init__(
        self,
        manifest: Manifest,
        base: torch.Tensor,
        offsets: np.ndarray,
        rows: np.ndarray | None = None,
        *,
        blocks: list[torch.Tensor] | None = None,
        block: np.ndarray | None = None,
    ) -> None:
        self.manifest, self.base = manifest, base
        self._offsets = offsets
        self._bases = [base] if blocks is None else blocks
        self._block = block
        self._rows = rows
        self._names = manifest.names if rows is None else [manifest.names[i] for i in rows.tolist()]
        self._views: dict[str, torch.Tensor] = {}
        self._typed: dict[tuple[int, int], torch.Tensor] = {}
        self._plain: dict[str, torch.Tensor] | None = None  # after a mutation: an ordinary dict
        self._where: dict[str, int] | None = None

    # -- lookups ------------------------------------------------------------------------------------
    def _position(self, name: str) -> int:
        if self._rows is None:
            return self.manifest.table.index[name]
        if self._where is None:
            with paused_gc():
                self._where = dict(zip(self._names, range(len(self._names)), strict=True))
        return self._where[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._plain is not None:
            return self._plain[name]
        view = self._views.get(name)
        if view is None:
            view = self._views[name] = self._view(self._position(name))
        return view

    def _view(self, i: int) -> torch.Tensor:
        table = self.manifest.table
        row = i if self._rows is None else int(self._rows[i])
        code = int(table.dtypes[row])
        typed = self._typed_base(code, 0 if self._block is None else int(self._block[i]))
        shapes = table.__dict__.get("shapes")  # every shape, once built; one view needs only its own
        shape = shapes[row] if shapes is not None else table.shape(row)
        return typed.as_strided(shape, contiguous_strides(shape), int(self._offsets[i]) // typed.element_size())

    def __contains__(self, name: object) -> bool:
        if self._plain is not None:
            return name in self._plain
        if self._rows is None:
            return name in self.manifest.table.index
        try:
            self._position(name)  # type: ignore[arg-type]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._plain if self._plain is not None else self._names)

    def __len__(self) -> int:
        return len(self._plain if self._plain is not None else self._names)

    def _all(self) -> dict[str, torch.Tensor]:
        """Every view, built in one pass (the collector paused)."""
        if self._plain is not None:
            return self._plain
        if len(self._views) < len(self._names):
            table = self.manifest.table
            rows = range(len(self._names)) if self._rows is None else self._rows.tolist()
            codes, shapes, offsets = table.dtypes.tolist(), table.shapes, self._offsets.tolist()
            blocks = [0] * len(offsets) if self._block is None else self._block.tolist()
            typed: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
            built, views, strides = self._views, {}, contiguous_strides
            with paused_gc():
                for i, name in enumerate(self._names):
                    if built and name in built:
                        views[name] = built[name]
                        continue
                    row = rows[i]
                    key = (blocks[i], codes[row])
                    base = typed.get(key)
                    if base is None:
                        t = self._typed_base(*key[::-1])
                        base = typed[key] = (t, t.element_size())
                    shape = shapes[row]
                    views[name] = base[0].as_strided(shape, strides(shape), offsets[i] // base[1])
            self._views = views  # in set order
        return self._views

    def _typed_base(self, code: int, block: int = 0) -> torch.Tensor:
        typed = self._typed.get((block, code))
        if typed is None:
            typed = self._typed[block, code] = self._bases[block].view(DTYPES[DTYPE_CODES[code]])
        return typed

    def items(self) -> Any:
        return self._all().items()

    def values(self) -> Any:
        return self._all().values()

    # -- mutation: become a plain dict --------------------------------------------------------------
    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self._plain = dict(self._all())
        self._plain[name] = value

    def __delitem__(self, name: str) -> None:
        self._plain = dict(self._all())
        del self._plain[name]

    # -- what was read --------------------------------------------------------------------------------
    @property
    def rows(self) -> np.ndarray | None:
        """The manifest rows these tensors are, in order (None: every row, in set order)."""
        return self._rows

    def fingerprints(self) -> np.ndarray:
        """Each tensor's fingerprint (uint64, in order; the manifest's definition) as its bytes
        lie in `base`, computed in bulk where the buffer lies."""
        sizes = self.manifest.sizes if self._rows is None else self.manifest.sizes[self._rows]
        version = self.manifest.fp_version
        if self._block is None:
            return slab_fingerprints(self.base, self._offsets, sizes, version=version)
        return np.array(fingerprints(list(self.values()), version=version), dtype=np.uint64)  # gathered

    @property
    def name(self) -> str:
        """The set these tensors were read from."""
        return self.manifest.name

    @property
    def version(self) -> int:
        """The version they were read from (what "latest" resolved to)."""
        return self.manifest.version

    def __repr__(self) -> str:
        m = self.manifest
        return f"TensorMap({len(self)} tensors of {m.name} v{m.version} on {self.base.device})"

    def __reduce__(self) -> Any:
        return dict, (dict(self.items()),)
