"""The etcd key schema: the one place that builds and parses tensord's keys.

Keys, under a configurable prefix (default ``/tensord/``); values are msgpack of ``to_wire()``
or a decimal integer::

    nodes/<node>                                   node record      node lease
    sets/<name>/@v/<version>                       manifest (head)  durable
    sets/<name>/@p/<version>/<digest>/<part>       manifest part    durable, with its version
    sets/<name>/@r/<version>/<node>/<device>       replica          node lease
    sets/<name>/@s/<version>/<node>/<device>       partial replica  node lease (a streaming pull)
    sets/<name>/@latest                            decimal version  durable, moved forward by txn
    sets/<name>/@next                              decimal version  durable, compare-and-swap

A set name is ``[a-z0-9._-]`` segments joined by ``/`` (``tensord_contract.names``): it never holds ``@``,
so the first ``/@`` of a key ends the name. A scan of set ``a``'s ``sets/a/@v/`` can never
reach set ``a/b`` (``sets/a/b/@v/...``) nor set ``a/v/1``. Versions in keys are zero-padded to
20 digits: key order is numeric order, and one version's key is never a prefix of another's.
Node and device are percent-quoted: they may hold ``:`` or ``/``. Names are validated here
(``InvalidArgument``).
"""

from __future__ import annotations

from urllib.parse import quote

from tensord_contract.names import check_name, check_prefix


def pad(n: int) -> bytes:
    """A version or part number as a fixed-width key segment."""
    return f"{n:020d}".encode()


class Keys:
    """Every key of one registry prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"

    def _set(self, name: str) -> str:
        return f"{self.prefix}sets/{check_name(name)}/@"

    def latest(self, name: str) -> bytes:
        return self._set(name).encode() + b"latest"

    def next(self, name: str) -> bytes:
        return self._set(name).encode() + b"next"

    def versions(self, name: str) -> bytes:
        """The prefix of a set's version keys; `version_of` reads a key under it."""
        return f"{self._set(name)}v/".encode()

    def version(self, name: str, version: int) -> bytes:
        return self.versions(name) + pad(version)

    def parts(self, name: str, version: int, digest: bytes | None = None) -> bytes:
        """The prefix of a version's manifest parts (of one body, when `digest` is given)."""
        prefix = f"{self._set(name)}p/".encode() + pad(version) + b"/"
        return prefix if digest is None else prefix + digest + b"/"

    def part(self, name: str, version: int, digest: bytes, index: int) -> bytes:
        return self.parts(name, version, digest) + pad(index)

    def replicas(self, name: str, version: int) -> bytes:
        return f"{self._set(name)}r/".encode() + pad(version) + b"/"

    def replica(self, name: str, version: int, node: str, device: str) -> bytes:
        return self.replicas(name, version) + _node_device(node, device)

    def partials(self, name: str, version: int) -> bytes:
        return f"{self._set(name)}s/".encode() + pad(version) + b"/"

    def partial(self, name: str, version: int, node: str, device: str) -> bytes:
        return self.partials(name, version) + _node_device(node, device)

    def nodes(self) -> bytes:
        return f"{self.prefix}nodes/".encode()

    def node(self, node: str) -> bytes:
        return self.nodes() + quote(node, safe="").encode()

    def names(self, prefix: str = "") -> bytes:
        """The scan that finds every set whose name starts with `prefix`."""
        return f"{self.prefix}sets/{check_prefix(prefix)}".encode()

    def name_of_version_key(self, key: bytes) -> str | None:
        """The set name of a version key found by a `names` scan; None for any other key."""
        name, _, kind = key.decode()[len(self.prefix) + len("sets/") :].partition("/@")
        return name if kind.startswith("v/") else None

    @staticmethod
    def version_of(prefix: bytes, key: bytes) -> int:
        """The version a key under `versions(name)` names."""
        return int(key[len(prefix) :])


def _node_device(node: str, device: str) -> bytes:
    return f"{quote(node, safe='')}/{quote(device, safe='')}".encode()
