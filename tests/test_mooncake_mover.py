"""The engine that moves bytes over nvlink_intra is made on first use and renewed once no
transfer uses it (`tensord_dataplane.transport.mooncake_mover`); engines here are stand-ins
whose destruction is recorded (the native one unmaps what it mapped)."""

from __future__ import annotations

import threading
import time
import weakref

from tensord_dataplane.transport.mooncake_mover import Mover


class Engine:
    made = 0

    def __init__(self) -> None:
        Engine.made += 1
        self.number = Engine.made


def test_the_engine_is_made_once_and_renewed_per_generation() -> None:
    Engine.made = 0
    mover = Mover(Engine)
    with mover.use() as (a, gen):
        pass
    with mover.use() as (b, same):
        pass
    assert a is b and gen == same == 0 and Engine.made == 1
    gone = weakref.ref(a)
    del a, b
    mover.renew(gen)
    assert gone() is None  # destroyed before another is made
    mover.renew(gen)  # a stale generation: renewed already, nothing happens
    with mover.use() as (c, gen2):
        assert c.number == 2 and gen2 == 1
    mover.close()


def test_renewal_waits_for_transfers_in_flight_and_new_ones_wait_for_it() -> None:
    Engine.made = 0
    mover = Mover(Engine)
    events: list[str] = []
    inside = threading.Event()
    leave = threading.Event()

    def transfer() -> None:
        with mover.use():
            inside.set()
            leave.wait(5)
            events.append("transfer done")

    t = threading.Thread(target=transfer)
    t.start()
    inside.wait(5)
    renewer = threading.Thread(target=lambda: (mover.renew(0), events.append("renewed")))
    renewer.start()
    time.sleep(0.2)
    assert events == []  # the renewal waits for the transfer using the engine
    leave.set()
    t.join(5)
    renewer.join(5)
    assert events == ["transfer done", "renewed"]
    with mover.use() as (engine, generation):
        assert engine.number == 2 and generation == 1
    mover.close()
