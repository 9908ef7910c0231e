"""Where each chunk of a streaming pull comes from: the policy, in one place.

Pure code (no I/O, no clock of its own): the daemon (`tensord.fleet.pull`, `tensord.fleet.serve`)
and the simulator (`benchmarks/fleet_sim.py`) run exactly this. Change the policy here.

**Puller** (`Plan`, one per pull of one version). It keeps one request outstanding at each
source it knows, and reads what a source grants while already asking it for more:

1. Order. Chunks are wanted in a rotated order starting at `start`: the i-th of n targets of a
   fan-out starts at i * chunks / n, a lone pull at a hash of its node id. Pullers that start
   together ask the seed for different chunks first, and so have something to give each other
   at once.
2. Partial holders are asked *open* requests: "up to `batch` of the chunks I still want (a
   bitmap), whichever you hold; wait until you hold one". First those known to hold some of
   them (**partial holders ahead of the requester**), within the window, **same host first**,
   then the **fewest reads in flight**; then a few others as subscriptions (they answer when
   they have something): a request is also how the puller hears of a holder's progress.
3. A complete holder is asked only for chunks that no live partial holder is known to hold and
   that no redirect points elsewhere for, unless the chunk is *forced* (a redirect for it
   failed or stalled): so the seed is asked for what nobody else has. Among complete holders:
   **same host first**, then the **fewest reads in flight** (as each last said), then a fixed
   pseudo-random order per (puller, holder) pair; each gets different chunks.
4. A chunk a holder redirected to another node (that node is receiving it) is asked of that
   node, by name. If it has not come after `stall` seconds, or that node failed, it is forced.
5. At most `max_sources` partial holders are known at once (same-host ones and redirect targets
   come on top); a source takes a new request while what is being read from it leaves room in
   the window for another batch (so one source alone keeps several batches in flight).

**Holder** (`Book`, one per version it serves):

- It grants chunks it holds while it has free upload slots (`slots` chunks granted and not yet
  read), and remembers every grant.
- A *complete* holder (the seed) redirects a request for a chunk it already granted to another
  puller to that puller (the one it redirected to least), unless the chunk is forced: the seed
  sends each chunk about once, however many pull at once.
- A partial holder short of slots redirects named chunks the same way, else the request waits.
- A chunk a partial holder lacks waits for as long as its own pull runs (it is on its way);
  after that it is absent and the puller looks elsewhere.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import numpy as np


def start_of(index: int, of: int, chunks: int) -> int:
    """Where the `index`-th of `of` simultaneous pullers starts in a set of `chunks` chunks."""
    return (index * chunks) // max(of, 1) % max(chunks, 1)


def start_for(node: str, chunks: int) -> int:
    """Where a lone puller starts: a hash of its node id."""
    return zlib.crc32(node.encode()) % max(chunks, 1)


def rotation(start: int, count: int) -> np.ndarray:
    """Chunk indices in the order of a puller that starts at `start`."""
    return np.roll(np.arange(count, dtype=np.int64), -(start % max(count, 1)))


@dataclass(eq=False)
class Source:
    """What a puller knows about one holder of the version it pulls."""

    node: str
    complete: bool
    have: np.ndarray  # bool per chunk; all True for a complete holder
    same_host: bool = False
    busy: int = 0  # reads in flight on it, as it last said
    asking: bool = False  # a request of this plan is outstanding there
    pending: int = 0  # the limit of this plan's open request outstanding there (window room it holds)
    subscribed: bool = False  # that request went to a holder not known to have anything wanted
    reading: int = 0  # chunks granted by it that this plan is reading
    backoff: bool = False  # it said it was full: ask again once a read from it is done
    used: float = 0.0  # when it last granted this plan something
    dead: bool = False
    spread: int = 0  # fixed tiebreak between equal holders


@dataclass(frozen=True)
class Request:
    """One request to `node`: named `chunks` (`force`: those a complete holder must grant
    rather than redirect), or an open request (`want` set: any of those, at most `limit`).
    `done`: chunks read from it since the last request, `declined`: chunks it granted that
    were not read (they came from elsewhere first); either way their upload slots are free."""

    node: str
    chunks: list[int] = field(default_factory=list)
    force: list[int] = field(default_factory=list)
    want: np.ndarray | None = None
    limit: int = 0
    done: list[int] = field(default_factory=list)
    declined: list[int] = field(default_factory=list)  # granted, not read (it came elsewhere)

    @property
    def open(self) -> bool:
        return self.want is not None

    @property
    def asks(self) -> bool:
        return bool(self.chunks) or self.open


class Plan:
    """One puller's knowledge and choices. Not thread-safe: one owner drives it."""

    def __init__(
        self,
        me: str,
        count: int,
        *,
        start: int = 0,
        batch: int = 2,
        window: int = 8,
        stall: float = 5.0,
        max_sources: int = 32,
    ) -> None:
        if count < 1 or batch < 1 or max_sources < 1:
            raise ValueError("a plan needs at least one chunk, a batch and a source")
        self.me, self.count, self.batch, self.window, self.stall = me, count, batch, max(window, batch), stall
        self.max_sources = max_sources
        self.start = start % count
        self.order = rotation(start, count)
        self.rank = np.empty(count, dtype=np.int64)  # position of each chunk in `order`
        self.rank[self.order] = np.arange(count)
        self.need = np.ones(count, dtype=bool)  # not held yet
        self.flight = np.zeros(count, dtype=bool)  # asked by name, or granted and being read
        self.sources: dict[str, Source] = {}
        self.hints: dict[int, tuple[str, float]] = {}  # chunk -> (node redirected to, since)
        self.forced: set[int] = set()
        self.acks: dict[str, list[int]] = {}
        self.holders = np.zeros(count, dtype=np.int32)  # live partial sources known to hold each chunk
        self.sourced: dict[str, int] = {}  # chunks received per source
        self._asked: dict[int, str] = {}  # chunk asked by name, not answered yet -> of whom
        self._reading: dict[int, str] = {}  # chunk being read -> from whom
        self.declines: dict[str, list[int]] = {}
        self.dead: set[str] = set()  # sources that failed: never asked again
        self._complete = 0  # complete sources among `sources`
        self._used = 0  # chunks being read, plus the limits of open requests outstanding

    # -- knowledge ----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return not self.need.any()

    @property
    def held(self) -> int:
        return int(self.count - self.need.sum())

    def offer(
        self,
        node: str,
        *,
        complete: bool,
        have: np.ndarray | None = None,
        busy: int | None = None,
        same_host: bool | None = None,
        always: bool = False,
    ) -> Source | None:
        """Learn of a holder or of its progress (bitmaps only grow: they are merged). A new
        holder beyond `max_sources` (complete and partial ones counted apart) is ignored, unless
        `always` or on the same host: then an idle partial holder is dropped for it."""
        if node == self.me:
            return None
        if node in self.dead:
            return None
        s = self.sources.get(node)
        if s is None:
            known = self._complete if complete else len(self.sources) - self._complete
            if known >= self.max_sources:
                if not always and not same_host:
                    return None
                if not complete:
                    self._evict()
            spread = zlib.crc32(f"{self.me}>{node}".encode())
            s = self.sources[node] = Source(node, False, np.zeros(self.count, dtype=bool), spread=spread)
        if complete and not s.complete:
            self.holders -= s.have
            s.complete = True
            s.have[:] = True
            self._complete += 1
        elif not s.complete and have is not None:
            new = have & ~s.have
            if new.any():
                s.have |= new
                self.holders += new
        if busy is not None:
            s.busy = busy
        if same_host is not None:
            s.same_host = same_host
        return s

    def _evict(self) -> None:
        """Forget the partial holder used longest ago among those with nothing outstanding."""
        hinted = {n for n, _ in self.hints.values()}
        idle = [
            x
            for x in self.sources.values()
            if not x.complete
            and not x.asking
            and not x.reading
            and not x.same_host
            and x.node not in hinted
            and x.node not in self.acks
            and x.node not in self.declines
        ]
        if idle:
            x = min(idle, key=lambda x: (x.used, x.spread))
            del self.sources[x.node]
            self.holders -= x.have

    def fail(self, node: str) -> list[int]:
        """`node` died or no longer serves: drop it. Returns the chunks asked of it or being
        read from it (wanted again); chunks redirected to it become forced."""
        s = self.sources.pop(node, None)
        if s is None:
            return []
        self.dead.add(node)
        self._used -= s.reading + (s.pending if s.asking else 0)
        s.dead, s.asking, s.reading, s.pending = True, False, 0, 0
        if s.complete:
            self._complete -= 1
        else:
            self.holders -= s.have
        for c, (n, _) in list(self.hints.items()):
            if n == node:
                del self.hints[c]
                if self.need[c]:
                    self.forced.add(c)
        self.acks.pop(node, None)
        self.declines.pop(node, None)
        lost = [c for c, n in self._asked.items() if n == node] + [c for c, n in self._reading.items() if n == node]
        for c in lost:
            if self._asked.get(c) == node:
                del self._asked[c]
            if self._reading.get(c) == node:
                del self._reading[c]
            self.flight[c] = c in self._asked or c in self._reading
        return lost

    # -- choosing -----------------------------------------------------------------------------
    def next_requests(self, now: float) -> list[Request]:
        """The requests to send now (possibly none). Named chunks are marked in flight and
        every source asked is busy until it answers; acknowledgements of reads go along
        (alone when nothing else goes to that source). At most `window` chunks are being read
        or may be granted by open requests at once: a request by name waiting at a complete
        holder (for a slot) does not keep this plan from asking partial holders meanwhile."""
        self._expire(now)
        want = self.need & ~self.flight
        room = self.window - self._used
        free = [
            s for s in self.sources.values() if not s.asking and not s.backoff and s.reading + self.batch <= self.window
        ]
        out: list[Request] = []
        if room > 0 and want.any() and free:
            for node, (chunks, force) in self._named(free, want).items():
                s = self.sources[node]
                s.asking, s.pending = True, 0
                self.flight[chunks] = True
                for c in chunks:
                    self._asked[c] = node
                done, declined = self._acks(node)
                out.append(Request(node, chunks, force, done=done, declined=declined))
            want = self.need & ~self.flight  # less what was just asked by name
            if want.any():
                out += self._open(free, want, room)
        for node in list(dict.fromkeys([*self.acks, *self.declines])):
            if node in self.sources and not self.sources[node].asking:
                done, declined = self._acks(node)
                out.append(Request(node, done=done, declined=declined))
        return out

    def _open(self, free: list[Source], want: np.ndarray, room: int) -> list[Request]:
        """Open requests: first to partial holders known to hold some of what is wanted (ahead of
        this puller), within the window; then, to hear of their progress, to at most
        window / batch others (subscriptions: they answer once they hold something wanted)."""
        out = []
        ahead: list[Source] = []
        behind: list[Source] = []
        for s in free:
            if not s.complete and not s.asking:
                (ahead if (want & s.have).any() else behind).append(s)
        subscribed = sum(1 for s in self.sources.values() if s.asking and s.subscribed)
        for s in sorted(ahead, key=lambda s: (not s.same_host, s.busy, s.spread)):
            if room <= 0:
                break
            limit = min(self.batch, room)
            s.asking, s.pending, s.subscribed = True, limit, False
            self._used += limit
            room -= limit
            done, declined = self._acks(s.node)
            out.append(Request(s.node, want=want.copy(), limit=limit, done=done, declined=declined))
        for s in sorted(behind, key=lambda s: (not s.same_host, s.busy, s.spread)):
            if subscribed >= max(1, self.window // self.batch):
                break
            s.asking, s.pending, s.subscribed = True, 0, True
            subscribed += 1
            done, declined = self._acks(s.node)
            out.append(Request(s.node, want=want.copy(), limit=self.batch, done=done, declined=declined))
        return out

    def _acks(self, node: str) -> tuple[list[int], list[int]]:
        return self.acks.pop(node, []), self.declines.pop(node, [])

    def _named(self, free: list[Source], want: np.ndarray) -> dict[str, tuple[list[int], list[int]]]:
        """Chunks asked by name, and which of them forced: redirected ones of the nodes named
        (forced if that node is complete now: it must not redirect them again), and what only
        complete holders have, spread over those in the policy's order."""
        out: dict[str, tuple[list[int], list[int]]] = {}
        hinted: dict[str, list[int]] = {}
        for c, (n, _) in self.hints.items():
            if want[c]:
                hinted.setdefault(n, []).append(c)
        for s in free:
            if s.node in hinted:
                chunks = sorted(hinted[s.node], key=lambda c: self.rank[c])[: self.batch]
                out[s.node] = (chunks, chunks if s.complete else [c for c in chunks if c in self.forced])
        complete = sorted(
            (s for s in free if s.complete and s.node not in out), key=lambda s: (not s.same_host, s.busy, s.spread)
        )
        if not complete:
            return out
        seed_ok = want & (self.holders == 0)
        for c in self.hints:
            seed_ok[c] = False
        for c in self.forced:
            seed_ok[c] = bool(want[c]) and c not in self.hints
        chunks = self.order[seed_ok[self.order]][: self.batch * len(complete)].tolist()
        for i, s in enumerate(complete):
            part = chunks[i * self.batch : (i + 1) * self.batch]
            if part:
                out[s.node] = (part, [c for c in part if c in self.forced])
        return out

    def _expire(self, now: float) -> None:
        for c, (_, since) in list(self.hints.items()):
            if now - since > self.stall:
                del self.hints[c]
                if self.need[c]:
                    self.forced.add(c)

    # -- outcomes -----------------------------------------------------------------------------
    def on_reply(
        self,
        node: str,
        request: Request,
        granted: Collection[int],
        redirect: dict[int, str],
        now: float,
        *,
        have: np.ndarray | None = None,
        busy: int | None = None,
        complete: bool = False,
        gone: bool = False,
        full: bool = False,
    ) -> tuple[list[int], list[str]]:
        """A holder answered `request`. Returns the granted chunks to read now (the others,
        already held or being read, are acknowledged at once) and the nodes named by redirects
        that this plan did not know (the caller may tell it their host). `gone`: the holder
        will not get what this plan wants (its pull ended): it is dropped. `full`: it has no
        free slot for us until we finish reading what it granted."""
        s = self.sources.get(node)
        if s is None:
            return [], []
        self._used -= s.pending
        s.asking, s.pending = False, 0
        if gone:
            self.fail(node)
            return [], []
        s.backoff = full and s.reading > 0
        self.offer(node, complete=complete, have=have, busy=busy)
        granted = set(granted)
        for c in request.chunks:
            if self._asked.get(c) == node:
                del self._asked[c]
            if c not in granted:
                self.flight[c] = c in self._asked or c in self._reading
        read = []
        for c in granted:
            if self.need[c] and c not in self._reading:
                read.append(c)  # even if asked of another by name: that one is declined then
                self.flight[c] = True
                self._reading[c] = node
            else:
                self.declines.setdefault(node, []).append(c)
        s.reading += len(read)
        self._used += len(read)
        if read:
            s.used = now
        fresh = []
        for c, target in redirect.items():
            if not self.need[c] or target == self.me:
                continue
            t = self.sources.get(target)
            if target in self.dead:
                self.forced.add(c)
                continue
            if t is None:
                self.offer(target, complete=False, always=True)
                fresh.append(target)
            if self.hints.get(c, (None,))[0] != target:
                self.hints[c] = (target, now)
        return sorted(read, key=lambda c: self.rank[c]), fresh

    def received(self, node: str, chunks: Collection[int]) -> None:
        """The read of `chunks` from `node` succeeded."""
        for c in chunks:
            self.need[c] = False
            self.flight[c] = c in self._asked
            self._reading.pop(c, None)
            self.hints.pop(c, None)
            self.forced.discard(c)
        s = self.sources.get(node)
        if s is not None:
            done = min(s.reading, len(chunks))
            s.reading -= done
            self._used -= done
            s.backoff = False
            self.acks.setdefault(node, []).extend(chunks)
        self.sourced[node] = self.sourced.get(node, 0) + len(chunks)

    def retry(self, node: str, chunks: Collection[int]) -> None:
        """Reading these granted chunks from `node` did not work (but `node` still answers):
        they are wanted again, and declined to it."""
        s = self.sources.get(node)
        for c in chunks:
            if self._reading.get(c) == node:
                del self._reading[c]
                self.flight[c] = c in self._asked
                self.declines.setdefault(node, []).append(c)
                if s is not None and s.reading:
                    s.reading -= 1
                    self._used -= 1

    def lost(self, chunks: Collection[int]) -> None:
        """Chunks that arrived wrong (a fingerprint check failed): wanted again, from a complete holder."""
        for c in chunks:
            self.need[c] = True
            self.forced.add(c)


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

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a holder needs at least one upload slot")
        self.slots = slots
        self.out: dict[str, set[int]] = {}  # requester -> chunks granted, not yet read
        self.busy = 0  # chunks granted, not yet read
        self.grantees: dict[int, list[str]] = {}
        self.sent: dict[tuple[int, str], int] = {}  # (chunk, grantee) -> redirects sent there

    def ack(self, requester: str, chunks: Iterable[int]) -> None:
        out = self.out.get(requester)
        if out is not None:
            before = len(out)
            out.difference_update(chunks)
            self.busy -= before - len(out)
            if not out:
                del self.out[requester]

    def decline(self, requester: str, chunks: Iterable[int]) -> None:
        """`requester` will not read these grants (it got them elsewhere): the slots come
        free and it is no grantee of them (nobody is sent to it for them)."""
        chunks = list(chunks)
        self.ack(requester, chunks)
        for c in chunks:
            nodes = self.grantees.get(c)
            if nodes is not None and requester in nodes:
                nodes.remove(requester)
                self.sent.pop((c, requester), None)
                if not nodes:
                    del self.grantees[c]

    def release(self, requester: str) -> None:
        """`requester` is done with this holder (its pull ended): its grants end."""
        self.busy -= len(self.out.pop(requester, ()))

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
    ) -> Decision:
        """The answer to `requester`'s `request`. `held`: this holder's bitmap (None: it is
        complete); `coming`: its own pull still runs, so chunks it lacks are on their way;
        `order`: the requester's chunk order; `arrivals`: the chunks this holder holds, in the
        order they arrived (open requests get the newest first: the rarest, most likely)."""
        d = Decision()
        free = self.slots - self.busy
        if free <= 0 and self.out.get(requester):
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
