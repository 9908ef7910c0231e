"""tensord SDK: read and write named, versioned tensors held by a tensord daemon.

    import sdk
    version = sdk.put("my-model/tp0", model.state_dict())
    tensors = sdk.get("my-model/tp0")                 # a private copy
    with sdk.mount("my-model/tp0") as m:              # zero-copy, pinned until exit
        ...m.tensors...
    sdk.load_into(model, "my-model/tp0")              # straight into existing parameters

The module-level functions use one default `Client`, connected on first use to the daemon
socket in $TENSORD_SOCKET (default /run/tensord/tensord.sock).

Importing `sdk` is cheap: the client (and torch) load on first use of anything that needs
them. The errors, names and wire format live in `tensord_contract`, shared with the daemon.
"""

from __future__ import annotations

import importlib
import threading
from typing import TYPE_CHECKING, Any

from tensord_contract.errors import (
    IntegrityError,
    InvalidArgument,
    NotFound,
    OutOfCapacity,
    ProtocolError,
    TensordError,
    TransferError,
    Unauthorized,
    Unavailable,
    VersionConflict,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    import torch

    from sdk.catalogue import CatalogueClient
    from sdk.client import Client, Mount, Reservation
    from sdk.dataplane.fingerprint import fingerprint
    from sdk.dataplane.views import TensorMap

__all__ = [
    "CatalogueClient",
    "Client",
    "IntegrityError",
    "InvalidArgument",
    "Mount",
    "NotFound",
    "OutOfCapacity",
    "ProtocolError",
    "Reservation",
    "TensorMap",
    "TensordError",
    "TransferError",
    "Unauthorized",
    "Unavailable",
    "VersionConflict",
    "default_client",
    "delete",
    "fingerprint",
    "get",
    "info",
    "load_checkpoint",
    "load_into",
    "ls",
    "mount",
    "put",
    "replicate",
    "watch",
]

#: names this package loads on first use: name -> module
_LAZY = {
    "CatalogueClient": "sdk.catalogue",
    "Client": "sdk.client",
    "Mount": "sdk.client",
    "Reservation": "sdk.client",
    "TensorMap": "sdk.dataplane.views",
    "fingerprint": "sdk.dataplane.fingerprint",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The shared Client behind the module-level functions (created on first use)."""
    global _default
    from sdk.client import Client

    with _default_lock:
        if _default is None or _default.closed:
            _default = Client()
        return _default


def put(name: str, tensors: Mapping[str, torch.Tensor], *, device: str | None = None) -> int:
    """Store `tensors` as the next version of `name`; all or nothing. See `Client.put`."""
    return default_client().put(name, tensors, device=device)


def get(
    name: str,
    version: int | str | None = None,
    *,
    device: str | torch.device | None = None,
    names: list[str] | None = None,
    verify: bool = False,
) -> TensorMap:
    """A private copy of a version's tensors. See `Client.get`."""
    return default_client().get(name, version, device=device, names=names, verify=verify)


def mount(name: str, version: int | str | None = None) -> Mount:
    """Pin a version and map it zero-copy (same node). See `Client.mount`."""
    return default_client().mount(name, version)


def load_into(
    target: torch.nn.Module | Mapping[str, torch.Tensor],
    name: str,
    version: int | str | None = None,
    *,
    strict: bool = True,
    verify: bool = False,
) -> int:
    """Copy a version into existing tensors. See `Client.load_into`."""
    return default_client().load_into(target, name, version, strict=strict, verify=verify)


def ls(prefix: str = "") -> list[dict[str, Any]]:
    """Sets whose name starts with `prefix`. See `Client.ls`."""
    return default_client().ls(prefix)


def info(name: str, version: int | str | None = None, *, tensors: bool = False) -> dict[str, Any]:
    """One version's description. See `Client.info`."""
    return default_client().info(name, version, tensors=tensors)


def delete(name: str, version: int | None = None) -> int:
    """Delete one version or every version of `name` (idempotent). See `Client.delete`."""
    return default_client().delete(name, version)


def load_checkpoint(path: str, name: str, *, device: str = "cpu", threads: int | None = None) -> int:
    """Make the daemon load a checkpoint it reads itself. See `Client.load_checkpoint`."""
    return default_client().load_checkpoint(path, name, device=device, threads=threads)


def replicate(
    name: str,
    version: int | str | None = None,
    *,
    to: str | list[str] | None = None,
    progress: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Make a node, a list of nodes or "all" live nodes pull a copy of a version (several at
    once as one streamed fan-out; returns when all hold it). See `Client.replicate`."""
    return default_client().replicate(name, version, to=to, progress=progress)


def watch(name: str, *, after: int | None = None, timeout: float | None = None) -> Iterator[int]:
    """Yield each version of `name` as it is committed. See `Client.watch`."""
    return default_client().watch(name, after=after, timeout=timeout)
