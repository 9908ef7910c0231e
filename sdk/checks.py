"""What a read or a write compares against a manifest before (shapes, dtypes) and after
(fingerprints) it moves bytes, in bulk over whole tables; each names the first tensor at fault."""

from __future__ import annotations

from typing import Any

import numpy as np

from tensord_contract.errors import IntegrityError, InvalidArgument
from tensord_contract.manifest import DTYPE_CODES, Manifest, Table
from tensord_dataplane.fingerprint import mismatched_rows


def dims_of(table: Table, rows: np.ndarray) -> np.ndarray:
    """The dims of `rows`, concatenated in that order."""
    if not len(rows):
        return np.zeros(0, dtype=np.int64)
    starts, counts = table.dim_starts[rows], table.ndims[rows].astype(np.int64)
    take = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    return table.dims[take]


def check_targets(manifest: Manifest, rows: np.ndarray, keys: list[str], d: Any) -> None:
    """Every target's dtype and shape equal the set's, else InvalidArgument (nothing written)."""
    table = manifest.table
    same = np.array_equal(d.dtypes, table.dtypes[rows]) and np.array_equal(d.ndims, table.ndims[rows])
    if same and np.array_equal(d.dims, dims_of(table, rows)):
        return
    starts = np.cumsum(d.ndims.astype(np.int64)) - d.ndims
    for i, row in enumerate(rows.tolist()):
        spec = manifest.spec(row)
        shape = tuple(d.dims[starts[i] : starts[i] + d.ndims[i]].tolist())
        if d.dtypes[i] != table.dtypes[row] or shape != spec.shape:
            got = DTYPE_CODES[d.dtypes[i]]
            raise InvalidArgument(
                f"tensor {keys[i]!r}: target is {got} {shape}, the set holds {spec.dtype} {spec.shape}"
            )


def distinct_targets(
    manifest: Manifest, rows: np.ndarray, keys: list[str], d: Any, dense: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The `dense` targets to copy into, once each, and the ties: (i, j) pairs of targets that
    share memory (tied weights), of which only i is written. Targets may share memory only
    where the set holds the same bytes for both (equal fingerprints, `same_ties`); otherwise
    InvalidArgument naming two, nothing written (one batched copy would interleave them)."""
    no_ties = np.zeros((0, 2), dtype=np.int64)
    sel = dense[d.sizes[dense] > 0]
    if len(sel) < 2:
        return dense, no_ties
    order = sel[np.argsort(d.ptrs[sel], kind="stable")]
    starts, ends = d.ptrs[order], d.ptrs[order] + d.sizes[order]
    shared = np.flatnonzero(starts[1:] < np.maximum.accumulate(ends)[:-1]) + 1  # each overlaps one before it
    if not len(shared):
        return dense, no_ties
    ties = []
    for j in shared.tolist():
        i = j - 1
        while ends[i] <= starts[j]:  # the one before it that it overlaps
            i -= 1
        a, b = int(order[i]), int(order[j])
        if starts[i] != starts[j] or ends[i] != ends[j]:
            raise InvalidArgument(f"targets {keys[a]!r} and {keys[b]!r} overlap in memory: load them separately")
        ties.append((a, b))
    tied = np.array(ties, dtype=np.int64)
    if manifest.fingerprints is None:
        a, b = ties[0]
        raise InvalidArgument(f"targets {keys[a]!r} and {keys[b]!r} share memory: load them separately")
    if not same_ties(manifest, rows, tied):
        a, b = next((a, b) for a, b in ties if not same_ties(manifest, rows, np.array([(a, b)])))
        raise InvalidArgument(
            f"targets {keys[a]!r} and {keys[b]!r} share memory, and the set holds other bytes for them: "
            "load them separately"
        )
    return np.setdiff1d(dense, tied[:, 1], assume_unique=True), tied


def same_ties(manifest: Manifest, rows: np.ndarray, tied: np.ndarray) -> bool:
    """The set holds the same bytes for both targets of every tie (`distinct_targets`)."""
    fps = manifest.fingerprints
    if not len(tied):
        return True
    return fps is not None and bool(np.array_equal(fps[rows[tied[:, 0]]], fps[rows[tied[:, 1]]]))


def mismatch(
    manifest: Manifest,
    rows: np.ndarray,
    codes: np.ndarray,
    keys: list[str],
    dims: np.ndarray | None = None,
    ndims: np.ndarray | None = None,
) -> str:
    """Name the first tensor whose dtype or shape differs from the reservation."""
    table = manifest.table
    bad = np.flatnonzero(codes != table.dtypes[rows])
    if len(bad):
        i = int(bad[0])
        want = table.dtype_name(int(rows[i]))
        return f"tensor {keys[i]!r}: dtype {DTYPE_CODES[codes[i]]} differs from the reservation's {want}"
    assert dims is not None
    assert ndims is not None
    starts = np.cumsum(ndims.astype(np.int64)) - ndims
    for i, row in enumerate(rows.tolist()):
        got = tuple(dims[starts[i] : starts[i] + ndims[i]].tolist())
        if got != table.shape(row):
            return f"tensor {keys[i]!r}: shape {got} differs from the reservation's {table.shape(row)}"
    return "dtype/shape differ from the reservation"


def check_fingerprints(manifest: Manifest, rows: np.ndarray | None, actual: Any) -> None:
    """IntegrityError naming the first tensor of `rows` (None: all) whose fingerprint differs
    from the manifest's; a manifest without fingerprints checks nothing."""
    expected = manifest.fingerprints
    if expected is not None and rows is not None:
        expected = expected[rows]
    bad = mismatched_rows(expected, actual)
    if len(bad):
        row = int(bad[0]) if rows is None else int(rows[bad[0]])
        key = manifest.names[row]
        raise IntegrityError(
            f"tensor {key!r} of {manifest.name} v{manifest.version} fails its fingerprint",
            name=manifest.name,
            version=manifest.version,
            tensor=key,
        )
