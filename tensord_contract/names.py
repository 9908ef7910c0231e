"""Validation of set names and versions: the same rules in the SDK and the daemon."""

from __future__ import annotations

import re

from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument

MAX_NAME_BYTES = 255
#: Versions are 64-bit signed integers everywhere (the wire, etcd keys, the state directory).
MAX_VERSION = 2**63 - 1
_SEGMENT = re.compile(r"[a-z0-9._-]+")


def check_name(name: object) -> str:
    """Return `name` if it is a valid set name, else raise InvalidArgument.

    A name is segments of ``[a-z0-9._-]`` joined by ``/``; no empty, ``.`` or ``..`` segment;
    at most 255 bytes.
    """
    if not isinstance(name, str):
        raise InvalidArgument(f"name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidArgument("name must not be empty")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"name is longer than {MAX_NAME_BYTES} bytes", name=name[:64])
    for segment in name.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise InvalidArgument(
                f"bad name {name!r}: segments of [a-z0-9._-] joined by '/', no '.' or '..'",
                name=name,
            )
    return name


def check_prefix(prefix: object) -> str:
    """A listing prefix: empty, or a name, optionally ending in '/'."""
    if not isinstance(prefix, str):
        raise InvalidArgument(f"prefix must be a string, not {type(prefix).__name__}")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if stripped:
        check_name(stripped)
    return prefix


def check_version(version: object, *, allow_latest: bool = True) -> int | None:
    """A positive int (at most MAX_VERSION), or None / "latest" for the newest committed version."""
    if version is None or (allow_latest and version == "latest"):
        return None
    if not is_int(version, 1, MAX_VERSION):
        small = isinstance(version, str | float) or (isinstance(version, int) and version.bit_length() < 128)
        shown = repr(version)[:60] if small else type(version).__name__
        raise InvalidArgument(f"version must be an integer from 1 to 2**63-1 or 'latest', not {shown}")
    return version
