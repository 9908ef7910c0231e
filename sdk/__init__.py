"""tensord SDK: read and write named, versioned tensors held by a tensord daemon.

    import sdk
    version = sdk.put("my-model/tp0", model.state_dict())
    tensors = sdk.get("my-model/tp0")                 # a private copy
    with sdk.mount("my-model/tp0") as m:              # zero-copy, pinned until exit
        ...m.tensors...
    sdk.load_into(model, "my-model/tp0")              # straight into existing parameters
    with sdk.publish("my-model/tp0", params):         # no copy: readers here read this GPU memory
        ...serve...

The module-level functions are the `Client` methods of the same name, called on one default
`Client` connected on first use to the daemon socket in $TENSORD_SOCKET (default
/run/tensord/tensord.sock); each is made from its method when first looked up, so it carries
the method's signature and docstring (`help(sdk.get)`).

Importing `sdk` is cheap: the client (and torch) load on first use of anything that needs
them. The errors, names and wire format live in `tensord_contract`, shared with the daemon.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from tensord_contract.errors import (
    IntegrityError,
    InvalidArgument,
    NotFound,
    OutOfCapacity,
    ProtocolError,
    Retryable,
    TensordError,
    TransferError,
    Unauthorized,
    Unavailable,
    VersionConflict,
)

if TYPE_CHECKING:
    from sdk.catalogue import CatalogueClient
    from sdk.client import Client, Mount, Reservation
    from tensord_dataplane.fingerprint import fingerprint
    from tensord_dataplane.views import TensorMap

__all__ = [
    "CatalogueClient",
    "Client",
    "IntegrityError",
    "InvalidArgument",
    "Mount",
    "NotFound",
    "OutOfCapacity",
    "ProtocolError",
    "Publication",
    "Reservation",
    "Retryable",
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
    "publish",
    "put",
    "replicate",
    "watch",
]

#: names this package loads on first use: name -> module
_LAZY = {
    "CatalogueClient": "sdk.catalogue",
    "Client": "sdk.client",
    "Mount": "sdk.client",
    "Publication": "sdk.client",
    "Reservation": "sdk.client",
    "TensorMap": "tensord_dataplane.views",
    "fingerprint": "tensord_dataplane.fingerprint",
}


def __getattr__(name: str) -> Any:
    if name in _FORWARDED:
        from sdk.client import Client

        value = _on_default(getattr(Client, name))
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'sdk' has no attribute {name!r}")
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


P = ParamSpec("P")
R = TypeVar("R")


def _on_default(method: Callable[Concatenate[Client, P], R]) -> Callable[P, R]:
    """`method` as a function called on `default_client()`, with its name, docstring and
    signature (less `self`)."""

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return method(default_client(), *args, **kwargs)

    signature = inspect.signature(method)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])  # type: ignore[attr-defined]
    call.__module__ = __name__
    return call


#: the module-level functions: the `Client` methods of the same name, made on first lookup
_FORWARDED = (
    "delete",
    "get",
    "info",
    "load_checkpoint",
    "load_into",
    "ls",
    "mount",
    "publish",
    "put",
    "replicate",
    "watch",
)

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ makes them on first use
    delete = _on_default(Client.delete)
    get = _on_default(Client.get)
    info = _on_default(Client.info)
    load_checkpoint = _on_default(Client.load_checkpoint)
    load_into = _on_default(Client.load_into)
    ls = _on_default(Client.ls)
    mount = _on_default(Client.mount)
    publish = _on_default(Client.publish)
    put = _on_default(Client.put)
    replicate = _on_default(Client.replicate)
    watch = _on_default(Client.watch)
