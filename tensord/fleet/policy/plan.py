"""The puller's side of the policy: `Plan` (rules 1-5 of `tensord.fleet.policy`)."""

from __future__ import annotations

import zlib
from collections.abc import Collection

import numpy as np

from tensord.fleet.policy.exchange import Request, Source, rotation


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
