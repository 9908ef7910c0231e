"""Checks of the values a reply carries, shared by the typed message modules: each predicate
says whether a value has its field's shape; `checked` builds a message from the fields a reply
has (keys it does not know are ignored: a newer daemon may say more)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tensord_contract.checks import is_int
from tensord_contract.errors import TensordError
from tensord_contract.message_checks import is_number
from tensord_contract.names import MAX_VERSION

# No numpy here: the catalogue's client uses these.


def reply_map(raw: object, op: str, error: type[TensordError]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise error(f"malformed {op} reply: {raw!r:.200}")
    return raw


def reply_list(raw: object, op: str, error: type[TensordError]) -> list[Any]:
    if not isinstance(raw, list):
        raise error(f"malformed {op} reply: {raw!r:.200}")
    return raw


def malformed(op: str, key: str, value: object, error: type[TensordError]) -> TensordError:
    return error(f"malformed {op} reply: {key} {value!r:.60}")


def is_version(value: object) -> bool:
    return is_int(value, 1, MAX_VERSION)


def is_versions(value: object) -> bool:
    return isinstance(value, list) and all(is_version(v) for v in value)


def optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


def is_str(v: object) -> bool:
    return isinstance(v, str)


def is_count(v: object) -> bool:
    return is_int(v, 0)


def is_bool(v: object) -> bool:
    return isinstance(v, bool)


def is_map(v: object) -> bool:
    return isinstance(v, dict)


def is_seconds(v: object) -> bool:
    return is_number(v, 0, float("inf"))


def checked(cls: Any, raw: dict[str, Any], op: str, checks: dict[str, Any], error: type[TensordError]) -> Any:
    """`cls` from the keys of `raw` it has fields for, each passing its check (a missing key
    reads as None: a check that refuses None makes it required)."""
    values = {}
    for f in fields(cls):
        value = raw.get(f.name)
        if not checks[f.name](value):
            raise malformed(op, f.name, value, error)
        values[f.name] = value
    return cls(**values)


def is_maps(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)
