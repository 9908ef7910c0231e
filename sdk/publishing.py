"""Publishing without a copy: advertise tensors that stay in this process's GPU memory as a
version of a set, for readers on this node (`Client.publish`).

The version exists while its `Publication` does: until `unpublish()`, or until this client's
connection closes (the process exits, the daemon restarts). Readers on this node map the
tensors' allocations and copy straight out of them; the daemon holds no copy and counts no
budget. The promise the publisher makes: **no writes to published tensors until `unpublish()`
returns**. `unpublish` waits for readers still pinning the version (up to its timeout); the
publication keeps the tensors referenced, so their memory cannot be freed and reused before.
Sets published this way are not readable from other nodes: put a copy for those.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from sdk.connection import Connection
from sdk.pinning import PinningClient
from tensord_contract.errors import InvalidArgument, NotFound, ProtocolError
from tensord_contract.manifest import Table
from tensord_contract.names import check_name
from tensord_dataplane.fingerprint import FINGERPRINT_VERSION
from tensord_dataplane.fingerprint import fingerprints as fingerprints_of
from tensord_dataplane.tensors import describe


class Publication:
    """One published version; `unpublish()` (or leaving the `with` block) withdraws it."""

    def __init__(self, client: PinningClient, conn: Connection, name: str, version: int, tensors: list[torch.Tensor]):
        self._client, self._conn = client, conn
        self.name, self.version = name, version
        self._tensors: list[torch.Tensor] | None = tensors  # kept: their memory must not be reused

    @property
    def published(self) -> bool:
        """Whether the version is still published (not withdrawn, connection alive)."""
        return self._tensors is not None and self._conn.alive() and not self._client.closed

    def unpublish(self, timeout: float | None = None) -> bool:
        """Withdraw the version; return once no reader pins it (True), or after `timeout`
        seconds (default 60) with readers left (False: their reads fail with TransferError,
        their mounts must not be used). Writing the tensors is safe once this returns.
        Idempotent; also answers True when the connection is gone (so is the publication)."""
        if self._tensors is None:
            return True
        args: dict[str, Any] = {"name": self.name, "version": self.version}
        if timeout is not None:
            args["timeout"] = timeout
        if not self._conn.alive() or self._client.closed:
            self._tensors = None
            return True
        try:
            result, _ = self._client._call_on(self._conn, self._lost(), "unpublish", **args)
        except NotFound:  # deleted meanwhile (tensord rm, retention): nothing published
            result = {"drained": True}
        self._tensors = None
        return bool(result.get("drained", False)) if isinstance(result, dict) else False

    def _lost(self) -> str:
        return f"{self.name} v{self.version}: the connection that published it was lost, and the publication with it"

    def __enter__(self) -> Publication:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpublish()

    def __repr__(self) -> str:
        state = "published" if self.published else "withdrawn"
        return f"Publication({self.name} v{self.version}, {state})"


class Publishing(PinningClient):
    """The publishing part of `sdk.Client`."""

    def publish(self, name: str, tensors: Mapping[str, torch.Tensor], *, origin: str | None = None) -> Publication:
        """Advertise `tensors` (dense, on one GPU) as the next version of `name`, without a copy:
        readers on this node read this process's memory. Do not write them until
        `unpublish()` returns. See the module doc for the lifetime."""
        check_name(name)
        if not isinstance(tensors, Mapping):
            raise InvalidArgument("tensors must be a mapping of str to torch.Tensor")
        if origin is not None and not isinstance(origin, str):
            raise InvalidArgument("origin must be a string")
        from tensord_dataplane.owned import export

        names = list(tensors)
        if not all(isinstance(k, str) for k in names):
            raise InvalidArgument("tensors must be keyed by name (str)")
        d = describe(tensors.values(), copy_sparse=False)
        replica = export(d, names)
        table = Table.of_columns(names, d.dtypes, d.ndims, d.dims)
        fps = np.array(fingerprints_of(d.tensors), dtype=np.uint64)
        wire = replica.to_wire()
        for key in ("nbytes", "generation", "kind"):
            del wire[key]
        conn = self._conn()
        if not conn.is_local:
            raise InvalidArgument("publishing without a copy needs the daemon of this node (its Unix socket)")
        args: dict[str, Any] = {
            "name": name,
            "tensors": table.to_wire(),
            "replica": wire,
            "fingerprints": fps.tobytes(),
            "fp": FINGERPRINT_VERSION,
        }
        if origin is not None:
            args["origin"] = origin
        result, _ = conn.call("publish", **args)
        if not isinstance(result, dict) or type(result.get("version")) is not int:
            raise ProtocolError(f"malformed publish reply: {result!r:.200}")
        return Publication(self, conn, name, result["version"], d.tensors)
