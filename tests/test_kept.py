"""What is made from read-only arrays is kept for the very same arrays, and only for them."""

from __future__ import annotations

import numpy as np

from tensord_dataplane.kept import KeptByArrays


def _frozen(*values: int) -> np.ndarray:
    a = np.array(values, dtype=np.int64)
    a.flags.writeable = False
    return a


def test_kept_for_the_same_read_only_arrays_only() -> None:
    kept: KeptByArrays[list[int]] = KeptByArrays(2)
    made = []

    def make() -> list[int]:
        made.append(1)
        return [len(made)]

    a, b = _frozen(1, 2), _frozen(3)
    first = kept.get((a, b), make)
    assert kept.get((a, b), make) is first and len(made) == 1
    assert kept.get((_frozen(1, 2), b), make) is not first  # equal contents, another array
    writable = np.array([1, 2])
    assert kept.get((writable, b), make) is not kept.get((writable, b), make)  # may change: made each time
    kept.get((b, a), make)
    assert kept.get((a, b), make) is not first  # the oldest went: two kept at most
