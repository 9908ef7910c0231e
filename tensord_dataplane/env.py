"""Integer settings of the data plane read from the environment, checked."""

from __future__ import annotations

import os

from tensord_contract.errors import InvalidArgument


def env_int(name: str, default: int, low: int, high: int) -> int:
    """`name`'s value as an int from `low` to `high` (`default` when unset or empty);
    InvalidArgument naming the variable otherwise."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise InvalidArgument(f"{name}={text!r:.40}: expected an integer from {low} to {high}")
    return value
