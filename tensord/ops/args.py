"""Argument checks shared by the ops: a request's args in order, and the small type checks
requests from untrusted clients need (msgpack gives bools where ints are expected, say)."""

from __future__ import annotations

from typing import Any

from tensord.rpc import brief
from tensord_contract.checks import is_int as is_int  # the ops take it from here with the other checks
from tensord_contract.errors import InvalidArgument
from tensord_contract.streams import MAX_WAIT as MAX_WAIT  # the longest a request may wait (long polls)
from tensord_contract.table_messages import fp_definition as _fp_definition


def args(request: dict[str, Any], *required: str, optional: tuple[str, ...] = ()) -> list[Any]:
    """The request's args in order; unknown or missing keys are errors."""
    known = {"op", *required, *optional}
    unknown = set(request) - known
    if unknown:
        raise InvalidArgument(f"{request['op']}: unknown arguments {brief(sorted(unknown))}")
    missing = [k for k in required if k not in request]
    if missing:
        raise InvalidArgument(f"{request['op']}: missing arguments {missing}")
    return [request.get(k) for k in (*required, *optional)]


def fp_definition(value: object) -> int:
    """The fingerprint definition a client says its fingerprints were made with (`fp`)."""
    return _fp_definition(value, InvalidArgument)


def is_number(value: object, low: float, high: float) -> bool:
    """Whether `value` is an int or a float from `low` to `high` (inclusive)."""
    return isinstance(value, int | float) and low <= value <= high


def node_list(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise InvalidArgument("exclude must be a list of node ids")
    return value
