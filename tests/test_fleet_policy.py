"""The source policy of streaming pulls (tensord.fleet.policy) and the chunk grid, without I/O."""

from __future__ import annotations

import numpy as np
import pytest

from tensord.fleet import chunks
from tensord.fleet.policy import Book, Plan, Request, rotation, start_for, start_of
from tensord.fleet.settings import auto_chunk
from tensord_contract import streams
from tensord_contract.errors import InvalidArgument, ProtocolError


def bits(count: int, held: list[int]) -> np.ndarray:
    out = np.zeros(count, dtype=bool)
    out[held] = True
    return out


def named(reqs: list[Request]) -> dict[str, list[int]]:
    return {r.node: r.chunks for r in reqs if r.chunks}


def opened(reqs: list[Request]) -> dict[str, int]:
    return {r.node: r.limit for r in reqs if r.open}


# -- the grid -----------------------------------------------------------------------------------
def test_grid_ranges_cover_the_slab_and_bitmaps_round_trip() -> None:
    g = chunks.Grid(1000 * 256 + 100, 64 * 256)
    assert g.count == 16
    starts, lengths = g.ranges([0, 15])
    assert starts.tolist() == [0, 15 * 64 * 256] and lengths.tolist() == [64 * 256, 1000 * 256 + 100 - 15 * 64 * 256]
    assert g.bytes_of(range(16)) == g.nbytes
    assert g.covering(np.array([64 * 256 - 256, 5 * 64 * 256]), np.array([512, 1])).tolist() == [0, 1, 5]
    held = bits(16, [0, 3, 15])
    assert streams.unpack_bitmap(streams.pack_bitmap(held), 16).tolist() == held.tolist()
    with pytest.raises(ProtocolError):
        streams.unpack_bitmap(b"\x00", 16)
    with pytest.raises(InvalidArgument):
        streams.chunk_list([16], 16, "chunks", InvalidArgument)
    with pytest.raises(InvalidArgument):
        chunks.Grid(100, 100)  # not a multiple of 256


def test_auto_chunks_and_rotated_starts() -> None:
    assert auto_chunk(10 << 20) == 64 << 20  # small sets: one 64 MiB chunk at least
    assert auto_chunk(700 * 10**9) == 1 << 30  # 700 GB: 1 GiB chunks, 652 of them
    assert [start_of(i, 4, 100) for i in range(4)] == [0, 25, 50, 75]
    assert rotation(3, 5).tolist() == [3, 4, 0, 1, 2]
    assert start_for("node-a", 1000) == start_for("node-a", 1000) != start_for("node-b", 1000)


# -- the puller ---------------------------------------------------------------------------------
def test_a_lone_puller_asks_the_seed_by_name_in_its_order() -> None:
    plan = Plan("me", 10, start=4, batch=2)
    plan.offer("seed", complete=True)
    reqs = plan.next_requests(0.0)
    assert named(reqs) == {"seed": [4, 5]}
    assert plan.next_requests(0.0) == []  # one request outstanding per source


def test_same_host_complete_holders_first_then_the_least_busy() -> None:
    plan = Plan("me", 10, batch=2)
    plan.offer("far", complete=True, busy=0, same_host=False)
    plan.offer("near", complete=True, busy=5, same_host=True)
    plan.offer("far2", complete=True, busy=1, same_host=False)
    assert named(plan.next_requests(0.0)) == {"near": [0, 1], "far": [2, 3], "far2": [4, 5]}


def test_a_chunk_a_partial_holder_has_is_not_asked_of_the_seed() -> None:
    plan = Plan("me", 6, batch=2, window=8)
    plan.offer("seed", complete=True)
    plan.offer("p", complete=False, have=bits(6, [0, 1, 2]))
    reqs = plan.next_requests(0.0)
    assert named(reqs) == {"seed": [3, 4]}  # what nobody else has
    assert opened(reqs) == {"p": 2}  # the partial holder: any of what I want that it has
    (open_req,) = [r for r in reqs if r.open]
    assert open_req.want is not None and open_req.want.tolist() == [True, True, True, False, False, True]


def test_a_redirect_is_followed_by_name_and_forced_onto_the_seed_when_it_stalls() -> None:
    plan = Plan("me", 4, batch=1, window=4, stall=5.0)
    plan.offer("seed", complete=True)
    (req,) = plan.next_requests(0.0)
    assert req.chunks == [0]
    read, fresh = plan.on_reply("seed", req, [], {0: "x"}, 0.1)
    assert read == [] and fresh == ["x"] and plan.hints[0][0] == "x"
    reqs = plan.next_requests(0.2)
    assert named(reqs) == {"x": [0], "seed": [1]}  # the redirected chunk goes to x, by name
    for r in reqs:
        plan.on_reply(r.node, r, [], {}, 0.3)  # nothing yet
    reqs = plan.next_requests(6.0)  # x did not deliver within `stall`
    assert 0 in named(reqs).get("seed", []) and 0 in next(r for r in reqs if r.node == "seed").force


def test_a_failed_holder_gives_back_its_chunks_and_forces_its_redirects() -> None:
    plan = Plan("me", 4, batch=2, window=4)
    plan.offer("seed", complete=True)
    plan.offer("relay", complete=False, have=bits(4, [2, 3]))
    reqs = plan.next_requests(0.0)
    relay_req = next(r for r in reqs if r.node == "relay")
    read, _ = plan.on_reply("relay", relay_req, [2, 3], {}, 0.1)
    assert read == [2, 3]
    seed_req = next(r for r in reqs if r.node == "seed")
    plan.on_reply("seed", seed_req, [], {0: "relay", 1: "relay"}, 0.1)
    assert sorted(plan.fail("relay")) == [2, 3]  # being read from it: wanted again
    assert plan.forced == {0, 1}
    reqs = plan.next_requests(0.2)
    assert named(reqs) == {"seed": [0, 1]} and reqs[0].force == [0, 1]
    assert plan.offer("relay", complete=False, have=bits(4, [0])) is None  # never again


def test_grants_of_chunks_already_coming_are_declined_and_acks_go_with_the_next_request() -> None:
    plan = Plan("me", 4, batch=2, window=8)
    plan.offer("a", complete=False, have=bits(4, [0, 1]))
    plan.offer("b", complete=False, have=bits(4, [0, 1]))
    ra, rb = sorted(plan.next_requests(0.0), key=lambda r: r.node)
    assert plan.on_reply("a", ra, [0], {}, 0.1)[0] == [0]
    assert plan.on_reply("b", rb, [0, 1], {}, 0.1)[0] == [1]  # 0 is being read from a
    plan.received("a", [0])
    plan.received("b", [1])
    reqs = {r.node: r for r in plan.next_requests(0.2)}
    assert reqs["a"].done == [0] and reqs["b"].done == [1] and reqs["b"].declined == [0]


def test_the_window_bounds_what_open_requests_may_bring() -> None:
    plan = Plan("me", 100, batch=2, window=4)
    for n in "abcdef":
        plan.offer(n, complete=False, have=bits(100, list(range(50))))
    assert sum(opened(plan.next_requests(0.0)).values()) == 4


def test_max_sources_bounds_partial_holders_but_not_redirect_targets() -> None:
    plan = Plan("me", 4, max_sources=2)
    assert plan.offer("p1", complete=False) is not None
    assert plan.offer("p2", complete=False) is not None
    assert plan.offer("p3", complete=False) is None
    assert plan.offer("p4", complete=False, always=True) is not None  # an idle one made room
    assert len([s for s in plan.sources.values() if not s.complete]) == 2


# -- the holder ---------------------------------------------------------------------------------
def test_the_seed_sends_each_chunk_once_and_redirects_the_rest() -> None:
    book = Book(slots=8)
    d = book.decide("a", Request("seed", [0, 1]), held=None, coming=False)
    assert d.granted == [0, 1] and d.final
    d = book.decide("b", Request("seed", [1, 2]), held=None, coming=False)
    assert d.granted == [2] and d.redirect == {1: "a"}
    d = book.decide("c", Request("seed", [1]), held=None, coming=False)
    assert d.redirect == {1: "a"}  # b was sent to a for it, not granted it
    d = book.decide("c", Request("seed", [1], force=[1]), held=None, coming=False)
    assert d.granted == [1]  # forced: its redirect failed
    book.decide("d", Request("seed", [3]), held=None, coming=False)
    book.decide("e", Request("seed", [3]), held=None, coming=False)  # -> d
    book.decline("d", [3])  # d did not read it: nobody is sent to d for it
    assert book.decide("f", Request("seed", [3]), held=None, coming=False).granted == [3]


def test_redirects_spread_over_the_grantees() -> None:
    book = Book(slots=1)
    book.decide("a", Request("seed", [0]), held=None, coming=False)
    book.ack("a", [0])
    book.decide("b", Request("seed", [0], force=[0]), held=None, coming=False)
    book.ack("b", [0])
    targets = [book.decide(f"r{i}", Request("seed", [0]), held=None, coming=False).redirect[0] for i in range(4)]
    assert sorted(targets) == ["a", "a", "b", "b"]


def test_a_partial_holder_grants_within_its_slots_and_makes_requests_wait() -> None:
    book = Book(slots=2, share=2)
    held = bits(6, [0, 1, 2])
    d = book.decide("a", Request("p", [0, 1, 2]), held=held, coming=True)
    assert d.granted == [0, 1] and d.waiting == [2]
    d = book.decide("b", Request("p", [3]), held=held, coming=True)  # on its way: wait
    assert not d.final and d.waiting == [3]
    assert book.decide("b", Request("p", [3]), held=held, coming=False).absent == [3]
    d = book.decide("a", Request("p", [2]), held=held, coming=True)
    assert d.full and d.final  # its own grants hold the slots: come back after reading them
    d = book.decide("b", Request("p", [0]), held=held, coming=True)
    assert d.redirect == {0: "a"}  # no slot: sent to a node it gave chunk 0 to
    book.ack("a", [0, 1])
    assert book.busy == 0
    d = book.decide("b", Request("p", want=bits(6, [0, 1, 2, 5]), limit=2), held=held, coming=True, arrivals=[1, 2, 0])
    assert d.granted == [0, 2]  # open request: the newest arrivals first
    d = book.decide("c", Request("p", want=bits(6, [5]), limit=2), held=held, coming=True)
    assert d.hold and not d.final
    assert book.decide("c", Request("p", want=bits(6, [5]), limit=2), held=held, coming=False).gone


def test_a_forgotten_requester_frees_its_slots_and_is_no_redirect_target() -> None:
    book = Book(slots=1)
    book.decide("a", Request("seed", [0]), held=None, coming=False)
    assert book.busy == 1
    book.forget("a")
    assert book.busy == 0
    assert book.decide("b", Request("seed", [0]), held=None, coming=False).granted == [0]


def test_one_requester_never_holds_every_slot_and_declines_only_its_own_grants() -> None:
    book = Book(slots=8)
    assert book.share == 6
    d = book.decide("hog", Request("seed", list(range(8))), held=None, coming=False)
    assert d.granted == list(range(6)) and book.busy == 6
    d = book.decide("hog", Request("seed", [6, 7]), held=None, coming=False)
    assert d.full and not d.granted  # at its share: come back after reading
    d = book.decide("real", Request("seed", [7], force=[7]), held=None, coming=False)
    assert d.granted == [7]  # a slot is left for another puller
    assert book.decline("hog", [7, 6, 100, 0, 0]) == [0]  # never granted to it: nothing changes
    assert book.busy == 6
    assert book.decline("stranger", [1, 2]) == [] and book.busy == 6


def test_a_grant_left_unread_gives_its_slot_back_after_its_ttl() -> None:
    book = Book(slots=4, ttl=10.0)
    assert book.decide("hog", Request("seed", [0, 1, 2]), held=None, coming=False, now=0.0).granted == [0, 1, 2]
    assert book.decide("hog2", Request("seed", [3]), held=None, coming=False, now=1.0).granted == [3]
    d = book.decide("real", Request("seed", [5], force=[5]), held=None, coming=False, now=5.0)
    assert not d.granted and d.waiting == [5]  # every slot held
    d = book.decide("real", Request("seed", [5], force=[5]), held=None, coming=False, now=10.5)
    assert d.granted == [5] and book.busy == 2  # hog's three expired; hog2's one not yet
    assert "hog" not in book.out and book.grantees.get(0) is None  # nobody is sent to hog for them
    book.ack("real", [5])
    assert book.busy == 1 and ("real", 5) not in book.due
    book.decide("x", Request("seed", []), held=None, coming=False, now=11.5)
    assert book.busy == 0 and not book.due
