"""Read with failover (`sdk.failover`) and the `Retryable` grouping of errors, without a daemon."""

from __future__ import annotations

import pytest

import sdk
from sdk.failover import read_with_failover
from tensord_contract.errors import CODES, from_wire


def test_retryable_groups_errors_without_a_code_of_its_own() -> None:
    assert issubclass(sdk.TransferError, sdk.Retryable) and issubclass(sdk.IntegrityError, sdk.Retryable)
    assert not issubclass(sdk.Unavailable, sdk.Retryable) and not issubclass(sdk.NotFound, sdk.Retryable)
    assert {
        "internal", "not_found", "version_conflict", "out_of_capacity", "invalid_argument", "unauthorized",
        "unavailable", "transfer_error", "integrity_error", "protocol_error",
    } == CODES  # fmt: skip
    assert isinstance(from_wire({"code": "integrity_error", "message": "m"}), sdk.Retryable)


def _reader(outcomes: dict[str, Exception | str]):  # type: ignore[no-untyped-def]
    tried: list[str] = []

    def read(node: str) -> str:
        tried.append(node)
        outcome = outcomes[node]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return read, tried


def test_fails_over_on_retryable_errors_and_verify() -> None:
    read, tried = _reader({"a": sdk.TransferError("gone"), "b": "bad bytes", "c": "good"})

    def verify(node: str, value: str) -> None:
        if value != "good":
            raise sdk.IntegrityError(f"{node} sent {value}")

    assert read_with_failover(["a", "b", "c", "d"], read, verify, where=str, what="x v1", limit=8) == "good"
    assert tried == ["a", "b", "c"]


def test_other_errors_and_replicas_that_may_not_fail_over_pass_through() -> None:
    read, tried = _reader({"a": sdk.ProtocolError("garbled"), "b": "ok"})
    with pytest.raises(sdk.ProtocolError):
        read_with_failover(["a", "b"], read, where=str, what="x v1", limit=8)
    read, tried = _reader({"local": sdk.IntegrityError("torn"), "b": "ok"})
    with pytest.raises(sdk.IntegrityError, match="torn"):
        read_with_failover(["local", "b"], read, where=str, may_fail_over=lambda c: c != "local", what="x", limit=8)
    assert tried == ["local"]


def test_one_error_lists_every_failure_and_no_candidate_past_the_limit_is_opened() -> None:
    opened: list[str] = []

    def candidates():  # type: ignore[no-untyped-def]
        for node in "abcdef":
            opened.append(node)
            yield node

    read, _ = _reader({n: sdk.TransferError(f"{n} died") for n in "abcdef"})
    with pytest.raises(sdk.TransferError, match="x v3: every replica failed") as info:
        read_with_failover(candidates(), read, where=str, what="x v3", limit=3, name="x", version=3)
    assert opened == ["a", "b", "c"]
    assert info.value.details == {"failed": {"a": "a died", "b": "b died", "c": "c died"}, "name": "x", "version": 3}
    assert "b: b died" in info.value.message
    assert isinstance(info.value.__cause__, sdk.TransferError)
