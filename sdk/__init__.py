"""tensord SDK: read and write named, versioned tensors held by a tensord daemon.

    import sdk
    version = sdk.put("my-model/tp0", model.state_dict())
    tensors = sdk.get("my-model/tp0")                 # a private copy
    with sdk.mount("my-model/tp0") as m:              # zero-copy, pinned until exit
        ...m.tensors...
    sdk.load_into(model, "my-model/tp0")              # straight into existing parameters

The module-level functions use one default `Client`, connected on first use to the daemon
socket in $TENSORD_SOCKET (default /run/tensord/tensord.sock).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from sdk.client import Client, Mount, Reservation
from sdk.errors import (
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
from sdk.tensors import fingerprint

__all__ = [
    "Client",
    "IntegrityError",
    "InvalidArgument",
    "Mount",
    "NotFound",
    "OutOfCapacity",
    "ProtocolError",
    "Reservation",
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

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The shared Client behind the module-level functions (created on first use)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Client()
        return _default


def put(name: str, tensors: Mapping[str, torch.Tensor], *, device: str | None = None) -> int:
    return default_client().put(name, tensors, device=device)


def get(
    name: str,
    version: int | str | None = None,
    *,
    device: str | torch.device | None = None,
    names: list[str] | None = None,
    verify: bool = False,
) -> dict[str, torch.Tensor]:
    return default_client().get(name, version, device=device, names=names, verify=verify)


def mount(name: str, version: int | str | None = None) -> Mount:
    return default_client().mount(name, version)


def load_into(
    target: torch.nn.Module | Mapping[str, torch.Tensor],
    name: str,
    version: int | str | None = None,
    *,
    strict: bool = True,
    verify: bool = False,
) -> int:
    return default_client().load_into(target, name, version, strict=strict, verify=verify)


def ls(prefix: str = "") -> list[dict[str, Any]]:
    return default_client().ls(prefix)


def info(name: str, version: int | str | None = None) -> dict[str, Any]:
    return default_client().info(name, version)


def delete(name: str, version: int | None = None) -> int:
    return default_client().delete(name, version)


def load_checkpoint(path: str, name: str, *, device: str = "cpu", threads: int | None = None) -> int:
    return default_client().load_checkpoint(path, name, device=device, threads=threads)


load_checkpoint.__doc__ = Client.load_checkpoint.__doc__


def replicate(name: str, version: int | str | None = None, *, to: str | None = None) -> dict[str, Any]:
    return default_client().replicate(name, version, to=to)


def watch(name: str, *, after: int | None = None, timeout: float | None = None) -> Iterator[int]:
    return default_client().watch(name, after=after, timeout=timeout)


replicate.__doc__, watch.__doc__ = Client.replicate.__doc__, Client.watch.__doc__
put.__doc__, get.__doc__, mount.__doc__ = Client.put.__doc__, Client.get.__doc__, Client.mount.__doc__
load_into.__doc__, ls.__doc__ = Client.load_into.__doc__, Client.ls.__doc__
info.__doc__, delete.__doc__ = Client.info.__doc__, Client.delete.__doc__
