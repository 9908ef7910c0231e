"""Read with failover: try replicas in turn until one delivers checked bytes.

One helper for every read that may come from one of several replicas: it takes the candidates
(opened lazily, the next only after the last failed), the read and the verify, fails over on
`Retryable` errors (bytes that did not move, or arrived wrong) and lets every other error
through, and when the candidates run out raises one TransferError listing what failed where.
Torch-free and numpy-free.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tensord_contract.errors import Retryable, TransferError

log = logging.getLogger(__name__)
C = TypeVar("C")
T = TypeVar("T")


def read_with_failover(
    candidates: Iterable[C],
    read: Callable[[C], T],
    verify: Callable[[C, T], None] | None = None,
    *,
    where: Callable[[C], str],
    may_fail_over: Callable[[C], bool] = lambda _: True,
    what: str,
    limit: int,
    **details: Any,
) -> T:
    """`read` the first candidate and `verify` what it returned; on a `Retryable` error from
    either, go on to the next candidate, up to `limit` of them.

    `where` names a candidate in messages (a node id); `may_fail_over` says whether a failure
    there may be retried elsewhere at all (a replica on this node is the only one the daemon
    offers first: its failure is raised as is). `what` names the read ("my-set v3") in the
    final TransferError, which carries `details` and `failed` ({where: message})."""
    failed: dict[str, str] = {}
    last: Retryable | None = None
    for candidate in itertools.islice(candidates, limit):  # islice asks for no candidate past the limit
        try:
            value = read(candidate)
            if verify is not None:
                verify(candidate, value)
            return value
        except Retryable as exc:
            if not may_fail_over(candidate):
                raise
            node, last = where(candidate), exc
            failed[node] = exc.message
            log.warning("read of %s from node %s failed (%s); trying another replica", what, node, exc.message)
    listing = "; ".join(f"{node}: {message}" for node, message in failed.items())
    raise TransferError(f"{what}: every replica failed ({listing})", failed=failed, **details) from last
