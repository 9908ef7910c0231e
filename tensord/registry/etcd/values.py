"""What etcd values hold: msgpack of ``to_wire()``, and manifests zlib-compressed, in parts.

A manifest that stays under `PART` bytes compressed lives in its version key; a larger one (a
~100,000-tensor set compresses to ~2 MB) is cut into parts of `PART` bytes, written first under
a key named by the body's digest, then the version key is created with a head naming them, in
the one transaction that makes the version exist: every request stays under etcd's default
``--max-request-bytes`` (1.5 MiB), readers never see a version without its parts, and two
racing commits of one version never mix their parts.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import msgpack

from tensord_contract.errors import ProtocolError
from tensord_contract.manifest import Manifest

PART = 1 << 20  # bytes of compressed manifest per key: under etcd's default request limit


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def encode_manifest(wire: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """A manifest as the version key's head and the parts it names (none when it fits)."""
    body = zlib.compress(pack(wire), 1)
    if len(body) <= PART:
        return {"zlib": body}, []
    digest = hashlib.sha256(body).hexdigest()[:32].encode()
    parts = [body[i : i + PART] for i in range(0, len(body), PART)]
    return {"parts": len(parts), "bytes": len(body), "digest": digest}, parts


def decode_manifest(head: Any, parts: list[bytes]) -> Manifest:
    try:
        if isinstance(head, dict) and "zlib" in head:
            body = head["zlib"]
        elif isinstance(head, dict) and head.get("parts") == len(parts):
            body = b"".join(parts)
            if len(body) != head.get("bytes") or hashlib.sha256(body).hexdigest()[:32].encode() != head.get("digest"):
                raise ProtocolError("a manifest's parts in etcd do not add up")
        else:
            raise ProtocolError(f"a manifest in etcd has {len(parts)} parts, its head says {head!r:.100}")
        return Manifest.from_wire(unpack(zlib.decompress(body)))
    except (zlib.error, ValueError, TypeError) as exc:
        raise ProtocolError(f"a manifest in etcd cannot be read: {exc}") from exc
