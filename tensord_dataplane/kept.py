"""What was made from read-only numpy arrays, found again by their identity.

A copy plan's columns are read-only arrays whose contents cannot change, so what a read or a copy
derives from them (copy tables, staging windows, preadv calls) is made once and kept, a few
plans' worth at a time, oldest first out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


class KeptByArrays(Generic[T]):
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._kept: dict[tuple[int, ...], tuple[tuple[Any, ...], T]] = {}
        self._lock = threading.Lock()

    def get(self, arrays: tuple[Any, ...], make: Callable[[], T]) -> T:
        """`make()`'s result for these arrays: kept if all are read-only numpy arrays (then
        found again for the very same arrays), else made each time."""
        if not all(isinstance(a, np.ndarray) and not a.flags.writeable for a in arrays):
            return make()
        key = tuple(map(id, arrays))
        with self._lock:
            hit = self._kept.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], arrays, strict=True)):
            return hit[1]
        made = make()
        with self._lock:
            self._kept[key] = (arrays, made)
            while len(self._kept) > self.capacity:
                del self._kept[next(iter(self._kept))]
        return made
