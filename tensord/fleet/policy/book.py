"""The holder's side of the policy: `Book` (what it granted, to whom) and its `Decision` on a
request (see `tensord.fleet.policy`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from tensord.fleet.policy.exchange import Request


@dataclass
class Decision:
    granted: list[int] = field(default_factory=list)
    redirect: dict[int, str] = field(default_factory=dict)
    waiting: list[int] = field(default_factory=list)  # named, on its way here or no free slot
    absent: list[int] = field(default_factory=list)  # named, not here and not coming
    hold: bool = False  # an open request: nothing to give yet (or no free slot); it waits
    gone: bool = False  # an open request: nothing wanted is here, and nothing is coming
    full: bool = False  # no free slot while the requester still reads earlier grants: ask later

    @property
    def final(self) -> bool:
        """Whether the holder answers now rather than wait for a chunk or a slot."""
        done = self.granted or self.redirect or self.absent or self.gone or self.full
        return bool(done or not (self.waiting or self.hold))


class Book:
    """What one holder remembers about the chunks of one version it handed out."""

    def __init__(self, slots: int, share: int | None = None, ttl: float = math.inf) -> None:
        """`share`: the most slots one requester holds at once (default: all but a quarter, at
        least one, so that one puller, or a hostile peer, never holds every slot); `ttl`: how
        long a grant holds its slot unread (decisions given the time `now` expire older ones)."""
        if slots < 1:
            raise ValueError("a holder needs at least one upload slot")
        self.slots = slots
        self.share = max(1, slots - max(1, slots // 4)) if share is None else share
        self.out: dict[str, set[int]] = {}  # requester -> chunks granted, not yet read
        self.busy = 0  # chunks granted, not yet read
        self.grantees: dict[int, list[str]] = {}
        self.sent: dict[tuple[int, str], int] = {}  # (chunk, grantee) -> redirects sent there
        self.ttl = ttl
        self.due: dict[tuple[str, int], float] = {}  # (requester, chunk) -> read by then

    def ack(self, requester: str, chunks: Iterable[int]) -> None:
        out = self.out.get(requester)
        if out is not None:
            read = out.intersection(chunks)
            out -= read
            self.busy -= len(read)
            for c in read:
                self.due.pop((requester, c), None)
            if not out:
                del self.out[requester]

    def decline(self, requester: str, chunks: Iterable[int]) -> list[int]:
        """`requester` will not read these grants (it got them elsewhere): the slots come
        free and it is no grantee of them (nobody is sent to it for them). Returns the chunks
        that were granted to it and not yet read (the others were never its to decline)."""
        out = self.out.get(requester, set())
        chunks = [c for c in dict.fromkeys(chunks) if c in out]
        self.ack(requester, chunks)
        for c in chunks:
            nodes = self.grantees.get(c)
            if nodes is not None and requester in nodes:
                nodes.remove(requester)
                self.sent.pop((c, requester), None)
                if not nodes:
                    del self.grantees[c]
        return chunks

    def release(self, requester: str) -> None:
        """`requester` is done with this holder (its pull ended): its grants end."""
        out = self.out.pop(requester, set())
        self.busy -= len(out)
        for c in out:
            self.due.pop((requester, c), None)

    def forget(self, requester: str) -> None:
        """`requester` went away: its grants end and nobody is redirected to it any more."""
        self.release(requester)
        for c, nodes in list(self.grantees.items()):
            if requester in nodes:
                nodes.remove(requester)
                self.sent.pop((c, requester), None)
                if not nodes:
                    del self.grantees[c]

    def decide(
        self,
        requester: str,
        request: Request,
        *,
        held: np.ndarray | None,
        coming: bool,
        order: np.ndarray | None = None,
        arrivals: list[int] | None = None,
        now: float | None = None,
    ) -> Decision:
        """The answer to `requester`'s `request`. `held`: this holder's bitmap (None: it is
        complete); `coming`: its own pull still runs, so chunks it lacks are on their way;
        `order`: the requester's chunk order; `arrivals`: the chunks this holder holds, in the
        order they arrived (open requests get the newest first: the rarest, most likely);
        `now`: the time, to expire grants unread for `ttl` (their slots come free)."""
        if now is not None:
            for r, c in [k for k, t in self.due.items() if t <= now]:
                self.decline(r, [c])
        d = Decision()
        mine = len(self.out.get(requester, ()))
        free = min(self.slots - self.busy, self.share - mine)
        if free <= 0 and mine:
            # Its own grants hold slots, and their acknowledgements come with its next request:
            # waiting for a slot here would wait for itself.
            d.full = True
            return d
        if request.want is not None:
            have = request.want if held is None else request.want & held
            take = min(request.limit, free)
            if have.any() and take > 0:
                if arrivals is not None and held is not None:
                    d.granted = _newest(arrivals, request.want, take)
                else:
                    ordered = order[have[order]] if order is not None else np.flatnonzero(have)
                    d.granted = ordered[:take].tolist()
            elif have.any() or coming:
                d.hold = True
            else:
                d.gone = True
        else:
            force = set(request.force)
            for c in request.chunks:
                if held is not None and not held[c]:
                    (d.waiting if coming else d.absent).append(c)
                    continue
                other = self._other(c, requester) if c not in force else None
                if held is None and other is not None:
                    d.redirect[c] = self._redirect(c, other)
                elif free > 0:
                    d.granted.append(c)
                    free -= 1
                elif other is not None:
                    d.redirect[c] = self._redirect(c, other)
                else:
                    d.waiting.append(c)
        if d.granted:
            out = self.out.setdefault(requester, set())
            before = len(out)
            out.update(d.granted)
            self.busy += len(out) - before
            for c in d.granted:
                if now is not None and self.ttl < math.inf:
                    self.due[(requester, c)] = now + self.ttl
                nodes = self.grantees.setdefault(c, [])
                if requester not in nodes:
                    nodes.append(requester)
        return d

    def _other(self, c: int, requester: str) -> str | None:
        """The grantee of `c` (not `requester`) this holder redirected to least, if any."""
        nodes = [n for n in self.grantees.get(c, ()) if n != requester]
        if not nodes:
            return None
        return min(nodes, key=lambda n: self.sent.get((c, n), 0))

    def _redirect(self, c: int, to: str) -> str:
        self.sent[(c, to)] = self.sent.get((c, to), 0) + 1
        return to


def _newest(arrivals: list[int], want: np.ndarray, take: int) -> list[int]:
    out = []
    for c in reversed(arrivals):
        if want[c]:
            out.append(c)
            if len(out) == take:
                break
    return out
