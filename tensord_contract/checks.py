"""Type checks for values from outside (requests, config files, checkpoint headers, a caller's
arguments): Python's bool is an int, and a stray True must not pass for 1."""

from __future__ import annotations

import re
from typing import TypeGuard


def is_int(value: object, low: int | None = None, high: int | None = None) -> TypeGuard[int]:
    """Whether `value` is an int, not a bool, from `low` to `high` (inclusive; None: no bound)."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


_DEVICE = re.compile(r"cpu|cuda:[0-9]{1,4}")


def is_device_name(value: object) -> TypeGuard[str]:
    """Whether `value` names a device: "cpu" or "cuda:N"."""
    return isinstance(value, str) and _DEVICE.fullmatch(value) is not None
