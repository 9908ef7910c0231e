"""A discrete-event model of streaming replication: time for N nodes to hold a complete replica.

    python benchmarks/fleet_sim.py                         # the 1,000-node table (700 GB, 400 GB/s)
    python benchmarks/fleet_sim.py --nodes 1,8,64,1000 --size 700e9 --bandwidth 400e9 --chunk 1GiB
    python benchmarks/fleet_sim.py --failures 3            # SIGKILL 3 relays mid-stream
    python benchmarks/fleet_sim.py --validate fleet.json   # against benchmarks/fleet.py's loopback runs

The pullers and holders run the daemon's own policy (`tensord.fleet.policy`: `Plan` per pull,
`Book` per holder, the same calls in the same order as `tensord.fleet.pull` and
`tensord.fleet.serve`); only the network and the clock are modelled:

- every node sends and receives at `bandwidth` bytes/s (full duplex): a sender splits its
  bandwidth evenly over its transfers, a receiver shares its own among its transfers by
  water-filling up to those caps (one side of max-min fairness: a little pessimistic), and
  with a finite `fabric` no transfer gets more than an even share of it (on one machine the
  fabric is its cores; `fabric_curve` can make it depend on how many nodes are busy); rates
  are re-timed whenever a transfer starts or ends;
- a request or a reply takes `latency` s one way; a read starts `read_latency` s after its grant;
- a pull spends `setup` s before its first request and `finish` + size / `verify_rate` s after
  its last chunk (fingerprints, sealing, the registry);
- partial holders' bitmaps reach other pullers through replies and redirects, and through the
  registry every `refresh` s; a killed node's connections fail after `detect` s.

Limits: no TCP slow start, no congestion beyond the fair shares, no per-chunk CPU cost other
than `read_latency` (fold it in there); the registry is free. Lower bound printed alongside:
S/B (every node must receive S bytes at B).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tensord.fleet.policy import Book, Decision, Plan, Request, start_of

NEWEST = True


@dataclass
class Params:
    nodes: int = 8  # pullers, all starting together
    seeds: int = 1  # complete holders at time 0
    size: float = 700e9
    chunk: float = float(1 << 30)
    bandwidth: float = 400e9  # bytes/s per node, each way
    latency: float = 50e-6  # one way, a request or a reply
    read_latency: float = 10e-6
    fabric: float = math.inf  # all transfers together (one machine's CPU, on loopback)
    fabric_curve: list[tuple[int, float]] = field(default_factory=list)  # (busy nodes, fabric) points
    setup: float = 0.0
    finish: float = 0.0
    verify_rate: float = math.inf
    batch: int = 2
    window: int = 8
    slots: int = 8
    stall: float = 5.0
    wait: float = 1.0
    max_sources: int = 32
    refresh: float = 2.0
    failures: list[tuple[float, int]] = field(default_factory=list)  # (time, puller index)
    detect: float = 0.0
    start_spread: float = 0.0  # pullers start spread over this many seconds
    seed: int = 0


@dataclass
class Result:
    params: Params
    ready: list[float]  # per puller; inf for those killed
    seed_egress: float  # bytes all seeds served, over the set size
    egress: list[float]  # bytes each puller served, over the set size
    events: int
    wall: float

    @property
    def bound(self) -> float:
        return self.params.size / self.params.bandwidth

    def summary(self) -> dict[str, Any]:
        alive = [t for t in self.ready if math.isfinite(t)]
        return {
            "nodes": self.params.nodes,
            "last_ready_s": max(alive) if alive else math.nan,
            "median_ready_s": statistics.median(alive) if alive else math.nan,
            "bound_s": self.bound,
            "ratio": (max(alive) / self.bound) if alive else math.nan,
            "seed_egress": self.seed_egress,
            "max_relay_egress": max(self.egress) if self.egress else 0.0,
            "events": self.events,
            "sim_wall_s": self.wall,
        }


class _Flow:
    __slots__ = ("chunks", "dst", "last", "rate", "remaining", "src", "stamp")

    def __init__(self, src: _Node, dst: _Node, nbytes: float, chunks: list[int], now: float) -> None:
        self.src, self.dst, self.remaining, self.chunks = src, dst, nbytes, chunks
        self.rate, self.last, self.stamp = 0.0, now, 0


class _Node:
    def __init__(self, index: int, name: str, count: int, *, seed: bool) -> None:
        self.index, self.name = index, name
        self.alive = True
        self.complete = seed
        self.pulling = False
        self.held = np.ones(count, dtype=bool) if seed else np.zeros(count, dtype=bool)
        self.plan: Plan | None = None
        self.book: Book | None = None
        self.out: dict[_Flow, None] = {}  # dicts, not sets: a run must not depend on addresses
        self.into: dict[_Flow, None] = {}
        self.waiters: list[tuple[_Node, Request, float]] = []
        self.served = 0.0
        self.arrivals: list[int] = []
        self.ready = math.inf


class Sim:
    def __init__(self, p: Params) -> None:
        self.p = p
        self.count = max(1, math.ceil(p.size / p.chunk))
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0
        self.flows: dict[_Flow, None] = {}
        self.seeds = [_Node(i, f"seed{i}", self.count, seed=True) for i in range(p.seeds)]
        self.pullers = [_Node(p.seeds + i, f"n{i}", self.count, seed=False) for i in range(p.nodes)]
        self.nodes = {n.name: n for n in self.seeds + self.pullers}
        for n in self.nodes.values():
            n.book = Book(p.slots)
        self.rng = random.Random(p.seed)
        self.open = p.nodes  # pullers neither complete nor dead

    # -- clock ----------------------------------------------------------------------------------
    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), fn, args))

    def run(self) -> Result:
        t0 = time.perf_counter()
        for i, n in enumerate(self.pullers):
            self.at(self.rng.uniform(0, self.p.start_spread) + self.p.setup, self._start, n, i)
        for when, index in self.p.failures:
            self.at(when, self._kill, self.pullers[index])
        if self.p.refresh > 0:
            self.at(self.p.refresh, self._refresh)
        while self._queue:
            when, _, fn, args = heapq.heappop(self._queue)
            self.now = when
            self.events += 1
            fn(*args)
            if self.open == 0:
                break
        size = self.p.size
        return Result(
            self.p,
            [n.ready for n in self.pullers],
            sum(s.served for s in self.seeds) / size,
            [n.served / size for n in self.pullers],
            self.events,
            time.perf_counter() - t0,
        )

    # -- pullers --------------------------------------------------------------------------------
    def _start(self, n: _Node, index: int) -> None:
        if not n.alive:
            return
        p = self.p
        n.pulling = True
        n.plan = Plan(
            n.name,
            self.count,
            start=start_of(index, p.nodes, self.count),
            batch=p.batch,
            window=p.window,
            stall=p.stall,
            max_sources=p.max_sources,
        )
        for s in self.seeds:  # the registry at start: complete replicas, and partial ones
            if s.alive:
                n.plan.offer(s.name, complete=True)
        self._learn_partials(n)
        self._pump(n)

    def _learn_partials(self, n: _Node) -> None:
        """What a puller hears of the others: at start from the fan-out (every target of it),
        later from the registry (those pulling)."""
        assert n.plan is not None
        others = [m for m in self.pullers if m is not n and m.alive and not m.complete]
        self.rng.shuffle(others)
        for m in others[: n.plan.max_sources]:
            n.plan.offer(m.name, complete=False, have=m.held.copy())

    def _refresh(self) -> None:
        for n in self.pullers:
            if n.alive and n.pulling and n.plan is not None:
                for m in self.pullers:
                    if m.complete and m.alive and m is not n:
                        n.plan.offer(m.name, complete=True)
                self._learn_partials(n)
                self._pump(n)
        if any(n.alive and not n.complete for n in self.pullers):
            self.at(self.now + self.p.refresh, self._refresh)

    def _pump(self, n: _Node) -> None:
        if not n.alive or n.plan is None or not n.pulling:
            return
        for req in n.plan.next_requests(self.now):
            self.at(self.now + self.p.latency, self._arrive, n, self.nodes[req.node], req)
        # wake up when a redirect may stall
        if n.plan.hints:
            soonest = min(since for _, since in n.plan.hints.values()) + n.plan.stall + 1e-9
            self.at(max(soonest, self.now), self._pump, n)

    def _reply(
        self,
        n: _Node,
        h: _Node,
        req: Request,
        granted: list[int],
        redirect: dict[int, str],
        have: np.ndarray,
        gone: bool = False,
        full: bool = False,
    ) -> None:
        if not n.alive or n.plan is None:
            return
        if n.complete or not n.pulling:  # a late answer: its sources were released
            return
        plan = n.plan
        if h.name not in plan.sources:
            return
        assert h.book is not None
        read, _ = plan.on_reply(
            h.name,
            req,
            granted,
            redirect,
            self.now,
            have=have,
            busy=h.book.busy,
            complete=h.complete,
            gone=gone,
            full=full,
        )
        if read:
            if not h.alive:
                self.at(self.now + self.p.detect, self._failed, n, h)
            else:
                grid = np.array(read)
                nbytes = float(np.minimum((grid + 1) * self.p.chunk, self.p.size).sum() - (grid * self.p.chunk).sum())
                self.at(self.now + self.p.read_latency, self._begin, h, n, nbytes, read)
        self._pump(n)

    def _failed(self, n: _Node, h: _Node) -> None:
        if n.alive and n.plan is not None:
            n.plan.fail(h.name)
            self._pump(n)

    def _received(self, f: _Flow) -> None:
        n, h = f.dst, f.src
        assert n.plan is not None
        n.held[f.chunks] = True
        n.arrivals.extend(f.chunks)
        n.plan.received(h.name, f.chunks)
        if n.plan.done and n.pulling:
            n.pulling = False
            self.at(self.now + self.p.finish + self.p.size / self.p.verify_rate, self._complete, n)
            self._wake(n)
        else:
            self._wake(n, f.chunks)
        self._pump(n)

    def _complete(self, n: _Node) -> None:
        if not n.alive:
            return
        n.complete = True
        n.ready = self.now
        self.open -= 1
        # it releases its pins at every source: their grants to it end
        if n.plan is not None:
            for node in n.plan.sources:
                self.at(self.now + self.p.latency, self._release, n, self.nodes[node])
            n.plan.acks.clear()
        self._wake(n)

    def _release(self, n: _Node, h: _Node) -> None:
        if h.alive:
            assert h.book is not None
            h.book.release(n.name)
            h.waiters = [w for w in h.waiters if w[0] is not n]
            self._wake(h)

    def _kill(self, n: _Node) -> None:
        if not n.alive or n.complete:
            return
        n.alive = False
        n.pulling = False
        self.open -= 1
        for f in [*n.out, *n.into]:
            self._stop(f)
            if f.dst is not n and f.dst.alive:  # its read from the dead node fails
                self.at(self.now + self.p.detect, self._failed, f.dst, n)
        for waiter, _, _ in n.waiters:
            self.at(self.now + self.p.detect, self._failed, waiter, n)
        n.waiters.clear()
        for m in self.nodes.values():  # sessions with the dead node close
            if m is not n and m.alive:
                self.at(self.now + self.p.detect, self._forget, m, n)

    def _forget(self, m: _Node, dead: _Node) -> None:
        assert m.book is not None
        m.book.forget(dead.name)
        m.waiters = [w for w in m.waiters if w[0] is not dead]
        self._wake(m)

    # -- holders --------------------------------------------------------------------------------
    def _arrive(self, n: _Node, h: _Node, req: Request) -> None:
        if not n.alive:
            return
        if not h.alive:
            if req.asks:
                self.at(self.now + self.p.detect + self.p.latency, self._failed, n, h)
            return
        assert h.book is not None
        if req.done:
            h.book.ack(n.name, req.done)
        if req.declined:
            h.book.decline(n.name, req.declined)
        if req.asks:
            self._decide(h, n, req, self.now + self.p.wait)
        if req.done or req.declined:
            self._wake(h)

    def _decide(self, h: _Node, n: _Node, req: Request, deadline: float) -> bool:
        assert h.book is not None
        d = self._ask(h, n, req)
        if d.final or self.now >= deadline:
            self.at(
                self.now + self.p.latency, self._reply, n, h, req, d.granted, d.redirect, h.held.copy(), d.gone, d.full
            )
            return True
        h.waiters.append((n, req, deadline))
        self.at(deadline, self._timeout, h, n, req)
        return False

    def _ask(self, h: _Node, n: _Node, req: Request) -> Decision:
        assert h.book is not None
        assert n.plan is not None
        return h.book.decide(
            n.name,
            req,
            held=None if h.complete else h.held,
            coming=h.pulling,
            order=n.plan.order,
            arrivals=h.arrivals if NEWEST else None,
        )

    def _timeout(self, h: _Node, n: _Node, req: Request) -> None:
        for i, (m, r, _) in enumerate(h.waiters):
            if m is n and r is req:
                del h.waiters[i]
                self._decide(h, n, req, self.now)
                return

    def _wake(self, h: _Node, arrived: list[int] | None = None) -> None:
        """Decide again the requests waiting at `h`: those that `arrived` chunks may serve,
        or all of them (a slot came free, its pull ended)."""
        if not h.waiters or not h.alive:
            return
        assert h.book is not None
        if arrived is None and h.book.busy >= h.book.slots and h.pulling:
            return
        waiting, h.waiters = h.waiters, []
        for n, req, deadline in waiting:
            if arrived is not None and not (
                req.want[arrived].any() if req.want is not None else set(req.chunks) & set(arrived)
            ):
                h.waiters.append((n, req, deadline))
                continue
            if n.alive:
                d = self._ask(h, n, req)
                if d.final:
                    self.at(
                        self.now + self.p.latency,
                        self._reply,
                        n,
                        h,
                        req,
                        d.granted,
                        d.redirect,
                        h.held.copy(),
                        d.gone,
                        d.full,
                    )
                else:
                    h.waiters.append((n, req, deadline))

    # -- the network ----------------------------------------------------------------------------
    def _begin(self, src: _Node, dst: _Node, nbytes: float, chunks: list[int]) -> None:
        if not src.alive:
            self.at(self.now + self.p.detect, self._failed, dst, src)
            return
        if not dst.alive:
            return
        f = _Flow(src, dst, nbytes, chunks, self.now)
        src.out[f] = dst.into[f] = self.flows[f] = None
        src.served += nbytes
        self._retime((src, dst))

    def _stop(self, f: _Flow) -> None:
        f.src.out.pop(f, None)
        f.dst.into.pop(f, None)
        self.flows.pop(f, None)
        f.stamp += 1
        self._retime((f.src, f.dst))

    def _end(self, f: _Flow, stamp: int) -> None:
        if stamp != f.stamp or f not in self.flows:
            return
        self._stop(f)
        self._received(f)

    def _retime(self, nodes: tuple[_Node, _Node]) -> None:
        """Rates after a transfer from nodes[0] to nodes[1] started or ended. A sender splits
        its bandwidth evenly over its transfers; a receiver fills its own bandwidth with its
        transfers up to those caps, evenly for the rest (water-filling); with a finite
        `fabric`, no transfer gets more than an even share of it."""
        src, dst = nodes
        if math.isfinite(self.p.fabric) or self.p.fabric_curve:
            receivers = list(dict.fromkeys(f.dst for f in self.flows))
        else:
            receivers = list(dict.fromkeys([dst, *(f.dst for f in src.out)]))
        b = self.p.bandwidth
        share = self._fabric() / max(len(self.flows), 1)
        for r in receivers:
            flows = sorted(r.into, key=lambda f: len(f.src.out), reverse=True)  # smallest cap first
            left, count = b, len(flows)
            for i, f in enumerate(flows):
                rate = min(b / len(f.src.out), share, left / (count - i))
                left -= rate
                if rate == f.rate:
                    continue
                f.remaining -= f.rate * (self.now - f.last)
                f.last = self.now
                f.rate = rate
                f.stamp += 1
                self.at(self.now + max(f.remaining, 0.0) / f.rate, self._end, f, f.stamp)

    def _fabric(self) -> float:
        """What all transfers together may move: `fabric`, or the curve's value for the nodes
        now moving bytes (linear between its points, flat beyond them)."""
        curve = self.p.fabric_curve
        if not curve:
            return self.p.fabric
        busy = len({n for f in self.flows for n in (f.src, f.dst)})
        xs = [float(x) for x, _ in curve]
        ys = [y for _, y in curve]
        return float(np.interp(busy, xs, ys))


def simulate(p: Params) -> Result:
    return Sim(p).run()


def _size(text: str) -> float:
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
    t = text.strip().lower()
    for u, m in units.items():
        if t.endswith(u):
            return float(t[: -len(u)]) * m
    return float(t)


def _fabric(cal: dict[str, Any]) -> float:
    """The machine's capacity: the mean of what the one-to-one runs moved in all (with 2, 4 and 8
    daemons busy the VM's two cores are saturated; the points differ by noise, not by a trend)."""
    curve = cal.get("fabric_curve") or [(0, cal["fabric"])]
    return float(statistics.mean(float(y) for _, y in curve))


def _loopback(cal: dict[str, Any], run: dict[str, Any], nodes: int, read_latency: float) -> Params:
    return Params(
        nodes=nodes,
        size=run["size"],
        chunk=run["chunk"],
        bandwidth=cal["bandwidth"],
        fabric=_fabric(cal),
        latency=cal["latency"],
        read_latency=read_latency,
        setup=cal["setup"],
        finish=cal["finish"],
        batch=run["batch"],
        window=run.get("window", 8),
        slots=run["slots"],
        refresh=run.get("refresh", 1.0),
    )


def fit_read_latency(cal: dict[str, Any], run: dict[str, Any]) -> float:
    """The per-read cost (Python, threads, polling) that makes the model's one-to-one pull take
    as long as the measured one (`pair_seconds` of one pair): bisection."""
    target = float(cal["pair_seconds"]["1"])
    lo, hi = 0.0, 0.5
    for _ in range(40):
        mid = (lo + hi) / 2
        if max(simulate(_loopback(cal, run, 1, mid)).ready) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def validate(path: Path, args: argparse.Namespace) -> None:
    """Model the loopback fan-outs that benchmarks/fleet.py measured. The machine's parameters
    come from its runs where the policy has nothing to choose: a raw engine read (per-node
    bandwidth), one-to-one pulls at once (what the machine moves in all: the fabric; one alone
    fixes the cost of a read), the RPC round trip and the pull's fixed phases. Then the
    fan-outs are predicted."""
    data = json.loads(path.read_text())
    cal = data["calibration"]
    runs = data["runs"]
    read_latency = fit_read_latency(cal, runs[0])
    curve = ", ".join(f"{n} busy {g / 1e9:.2f}" for n, g in cal.get("fabric_curve", []))
    print(
        f"loopback calibration ({data['machine']}): node bandwidth {cal['bandwidth'] / 1e9:.2f} GB/s, "
        f"fabric {_fabric(cal) / 1e9:.2f} GB/s (one-to-one pulls at once: {curve}), one-way RPC "
        f"{cal['latency'] * 1e3:.3f} ms, setup {cal['setup']:.3f} s, finish {cal['finish']:.3f} s; "
        f"fitted cost of a read {read_latency * 1e3:.2f} ms"
    )
    print("N = 1 is one of the calibration's one-to-one pulls; the others are predictions")
    print(f"{'N':>3} {'measured s':>11} {'(min-max)':>13} {'model s':>9} {'error':>7} {'seed egress meas/model':>24}")
    errors = []
    for run in runs:
        r = simulate(_loopback(cal, run, run["nodes"], read_latency))
        model = max(r.ready)
        err = model / run["seconds"] - 1
        if run["nodes"] > 1:
            errors.append(abs(err))
        lo, hi = run.get("spread", [run["seconds"]] * 2)
        print(
            f"{run['nodes']:>3} {run['seconds']:>11.3f} {f'({lo:.2f}-{hi:.2f})':>13} {model:>9.3f} {err:>+7.0%} "
            f"{run['seed_egress']:>11.2f} / {r.seed_egress:<10.2f}"
        )
    print(f"largest error of the predictions {max(errors or [0.0]):.0%} (target: within 20%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2,4,8,16,32,64,128,256,512,1000")
    ap.add_argument("--size", default="700e9")
    ap.add_argument("--chunk", default="1GiB")
    ap.add_argument("--bandwidth", default="400e9", help="bytes/s per node, each way")
    ap.add_argument("--latency", type=float, default=50e-6, help="one-way control latency, s")
    ap.add_argument("--read-latency", type=float, default=10e-6)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--failures", type=int, default=0, help="relays SIGKILLed at random mid-stream")
    ap.add_argument("--detect", type=float, default=0.0, help="seconds until a dead node's peers notice")
    ap.add_argument("--validate", type=Path, help="JSON written by benchmarks/fleet.py")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.validate:
        validate(args.validate, args)
        return
    base = Params(
        size=_size(args.size),
        chunk=_size(args.chunk),
        bandwidth=_size(args.bandwidth),
        latency=args.latency,
        read_latency=args.read_latency,
        seeds=args.seeds,
        batch=args.batch,
        window=args.window,
        slots=args.slots,
        detect=args.detect,
    )
    print(
        f"S = {base.size / 1e9:.0f} GB, B = {base.bandwidth / 1e9:.0f} GB/s per node, chunk "
        f"{base.chunk / 2**20:.0f} MiB, {base.seeds} seed(s), latency {base.latency * 1e6:.0f} us, "
        f"batch {base.batch}, window {base.window}, slots {base.slots}; S/B = {base.size / base.bandwidth:.3f} s"
    )
    print(
        f"{'N':>5} {'all ready s':>12} {'x S/B':>7} {'median s':>9} {'seed egress':>12} {'max relay':>10} {'sim s':>6}"
    )
    out = []
    rng = random.Random(1)
    for n in [int(x) for x in args.nodes.split(",")]:
        p = dataclasses.replace(base, nodes=n)
        if args.failures:
            bound = p.size / p.bandwidth
            p.failures = [(rng.uniform(0.2, 0.6) * bound, rng.randrange(n)) for _ in range(min(args.failures, n - 1))]
        s = simulate(p).summary()
        out.append(s)
        print(
            f"{n:>5} {s['last_ready_s']:>12.3f} {s['ratio']:>7.2f} {s['median_ready_s']:>9.3f} "
            f"{s['seed_egress']:>11.2f}x {s['max_relay_egress']:>9.2f}x {s['sim_wall_s']:>6.1f}"
        )
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
