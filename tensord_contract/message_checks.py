"""Limits and checks every typed message module shares (no dataclass, no numpy): importing
them costs nothing, so the `tensord` command's modules need not load the messages it never sends."""

from __future__ import annotations

from typing import Any

from tensord_contract.errors import TensordError

#: the most (version, generation) pairs a reader may say it holds manifests of
MAX_HAVE = 64
#: the longest an origin (where a version's bytes come from) may be
MAX_ORIGIN = 4096
#: the smallest chunk: below this, per-chunk costs (an RPC, an engine entry) dominate everything
MIN_CHUNK = 64 << 10
#: the longest a request may wait for something to happen (long polls, an unpublish's drain)
MAX_WAIT = 300.0
#: the most targets one fan-out may place (`replicate`'s `of`)
MAX_FAN_OUT = 4096


def check_keys(
    raw: dict[str, Any], op: str, required: tuple[str, ...], optional: tuple[str, ...], error: type[TensordError]
) -> None:
    """A request carries every key it needs and none it does not know (`op` aside)."""
    unknown = sorted(k for k in raw if k != "op" and k not in required and k not in optional)
    if unknown:
        raise error(f"{op}: unknown arguments {unknown!r:.200}")
    missing = [k for k in required if k not in raw]
    if missing:
        raise error(f"{op}: missing arguments {missing}")


def check_origin(origin: object, error: type[TensordError]) -> str | None:
    if origin is not None and (not isinstance(origin, str) or len(origin) > MAX_ORIGIN):
        raise error(f"origin must be a string of at most {MAX_ORIGIN} characters")
    return origin


def is_number(value: object, low: float, high: float) -> bool:
    """An int or a float (never a bool) from `low` to `high` (inclusive)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high
