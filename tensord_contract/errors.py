"""The one exception tree of tensord, and the closed set of wire error codes.

    TensordError
    ├── NotFound            no such set, version or reservation
    ├── VersionConflict     a version or name changed under the caller
    ├── OutOfCapacity       a device budget would be exceeded
    ├── InvalidArgument     a bad name, shape, dtype, frame or option
    ├── Unauthorized        missing or wrong token
    ├── Unavailable         the daemon or the registry cannot be reached
    ├── Retryable           one replica failed to deliver; another may succeed (never raised itself)
    │   ├── TransferError   bytes could not be moved
    │   └── IntegrityError  bytes arrived but their fingerprint is wrong
    └── ProtocolError       the peer broke the wire protocol

Errors cross the wire as ``{code, message, details}``; the code picks the class. `Retryable`
is a grouping, not a code: its members keep theirs, so it survives the wire with them.
`Unavailable` stays outside it: on the client it means this client's daemon (or its registry)
cannot be reached, which no other replica helps with; a peer the daemon cannot reach is the
daemon's to route around, and reaches the client as a TransferError.
"""

from __future__ import annotations

from typing import Any


class TensordError(Exception):
    """Root of every error raised by tensord and its SDK."""

    code = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class NotFound(TensordError):
    code = "not_found"


class VersionConflict(TensordError):
    code = "version_conflict"


class OutOfCapacity(TensordError):
    code = "out_of_capacity"


class InvalidArgument(TensordError, ValueError):
    code = "invalid_argument"


class Unauthorized(TensordError):
    code = "unauthorized"


class Unavailable(TensordError):
    code = "unavailable"


class Retryable(TensordError):
    """A read from one replica failed in a way another replica of the same version may not:
    catch this to fail over (`sdk.failover`), as httpx's TransportError groups its transport
    failures. A grouping only: raise one of its subclasses, which carry the wire codes."""


class TransferError(Retryable):
    code = "transfer_error"


class IntegrityError(Retryable):
    code = "integrity_error"


class ProtocolError(TensordError):
    code = "protocol_error"


_BY_CODE: dict[str, type[TensordError]] = {
    cls.code: cls
    for cls in (
        TensordError,
        NotFound,
        VersionConflict,
        OutOfCapacity,
        InvalidArgument,
        Unauthorized,
        Unavailable,
        TransferError,
        IntegrityError,
        ProtocolError,
    )
}

CODES = frozenset(_BY_CODE)


def from_wire(error: Any) -> TensordError:
    """Rebuild the exception a peer sent; an unknown or malformed error becomes ProtocolError."""
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return ProtocolError(f"malformed error reply: {error!r:.200}")
    cls = _BY_CODE.get(error["code"], TensordError)
    message = error.get("message")
    details = error.get("details")
    exc = cls(message if isinstance(message, str) else error["code"])
    exc.details = details if isinstance(details, dict) else {}
    return exc
