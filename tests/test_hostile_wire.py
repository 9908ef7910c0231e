"""Wire ops from clients that misbehave: a structured mutation fuzz of every scalar op's valid
arguments (wrong types, huge and negative ints, NaN, enormous lists, unknown keys), and a
client that goes away while the daemon waits on its behalf (`wait`, `unpublish` draining its
readers) gives back at once what its connection held: reservations, pins, publications."""

from __future__ import annotations

import copy
import random
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

from tensord_contract.manifest import table_of
from tests.frames import Raw, log_clean
from tests.test_publish import _args

TABLE = table_of({"t0": ("int8", (5,)), "t1": ("float32", (2, 3))})
BASES: dict[str, dict[str, Any]] = {
    "open": {"name": "wire/a", "version": 1, "exclude": ["n"], "have": [[1, 5]], "mount": True, "table_refs": True},
    "info": {"name": "wire/a", "version": 1, "tensors": "columns"},
    "wait": {"name": "wire/a", "after": 5, "timeout": 0},
    "ls": {"prefix": "wire/"},
    "release": {"pin": 1},
    "delete": {"name": "wire/gone", "version": 1},
    "unpublish": {"name": "wire/a", "version": 1, "timeout": 0},
    "replicate": {"name": "wire/a", "version": 1, "device": "cpu", "to": "all", "rate": 0, "chunk": 1 << 20},
    "stream_open": {"name": "wire/a", "version": 1, "node": "x", "chunk": 1 << 20},
    "stream_chunks": {"pin": 1, "chunks": [0], "wait": 0, "want": b"\x01", "limit": 1, "start": 0, "done": [0]},
    "stream_pair": {"node": "x", "host": "127.0.0.1", "port": 1, "key": "k", "backend": "gloo", "device": "cpu",
                    "to": "cpu"},
    "load": {"path": "/nonexistent/x.safetensors", "name": "wire/l", "device": "cpu", "threads": 1},
    "put_begin": {"name": "wire/p", "device": "cpu", "tensors": TABLE.to_wire(), "origin": "fuzz"},
    "put_commit": {"reservation": 1, "fingerprints": np.arange(2, dtype="<u8").tobytes(), "fp": 3},
    "put_abort": {"reservation": 1},
    "status": {},
    "nodes": {},
}  # fmt: skip
VALUES = [0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 2**48, 1024, None, True, False, 0.5, -0.0, float("nan"),
          float("inf"), -1e308, "", "x" * 300, "cuda:0", "cpu", "latest", "a\x00b", "../../etc", "\u202e", b"",
          b"\0" * 8, b"\xff" * 64, [], [1], ["x"] * 1000, list(range(5000)), [[1, 2]] * 3000, {}, {"a": 1},
          {b"k": 1}, [[[[1]]]], msgpack.ExtType(1, b"x")]  # fmt: skip


def _status(daemon) -> dict[str, Any]:
    with daemon.client() as c:
        return c.status()


def _settled(daemon, check, seconds: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    while not check(status := _status(daemon)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def test_mutated_arguments_of_every_op_get_no_internal_reply(daemon) -> None:
    probe = {"w": torch.randn(300), "i": torch.arange(77)}
    with daemon.client() as c:
        c.put("wire/a", probe)
    rng = random.Random(5)
    conns = [Raw(daemon.socket) for _ in range(4)]
    seen: dict[tuple[str, str], int] = {}
    for _ in range(4000):
        op = rng.choice(sorted(BASES))
        args = copy.deepcopy(BASES[op])
        for _ in range(rng.randint(0, 2)):
            if args and rng.random() < 0.1:
                args.pop(rng.choice(list(args)))
                continue
            key = rng.choice([*args, "extra"])
            value = rng.choice(VALUES)
            if isinstance(args.get(key), bytes) and args[key] and rng.random() < 0.5:
                cut = bytearray(args[key])
                cut[rng.randrange(len(cut))] = rng.randrange(256)
                value = bytes(cut[: rng.randrange(len(cut) + 1)])
            args[key] = value
        if op == "wait" and args.get("timeout") is None:
            args["timeout"] = 0  # a well-formed wait would hold its connection
        if op == "delete" and args.get("name") == "wire/a":
            args["name"] = "wire/gone"
        reply = rng.choice(conns).call(op, **args)
        outcome = "ok" if reply["ok"] else reply["error"]["code"]
        assert outcome != "internal", (op, args, reply)
        seen[op, outcome] = seen.get((op, outcome), 0) + 1
    assert sum(n for (_, o), n in seen.items() if o == "ok") > 500, seen
    assert sum(n for (_, o), n in seen.items() if o == "invalid_argument") > 1500, seen
    for conn in conns:
        conn.close()
    status = _settled(daemon, lambda s: (s["reservations"], s["pins"]) == (0, 0))
    assert (status["reservations"], status["pins"]) == (0, 0)
    with daemon.client() as c:
        got = c.get("wire/a", 1, verify=True)
        assert all(torch.equal(got[k], probe[k]) for k in probe)
    log_clean(daemon.log)


@pytest.mark.parametrize("op", ["wait", "unpublish"])
def test_a_client_gone_while_the_daemon_waits_for_it_gives_back_what_it_held(daemon, op: str) -> None:
    """The client holds a reservation, a pin and a publication, then asks for a long wait (a
    `wait` for a version that never comes, or an `unpublish` that drains a reader's pin) and
    closes its socket. Its holdings go within seconds, not when the wait ends (300 s); the
    reader of the withdrawn publication is told its bytes may have changed."""
    name = f"wire/gone-{op}"
    with daemon.client() as c:
        c.put(name, {"x": torch.ones(8)})
    base = _status(daemon)
    client, reader = Raw(daemon.socket), Raw(daemon.socket)
    try:
        assert client.call("put_begin", name=name, device="cpu", tensors=TABLE.to_wire())["ok"]
        assert client.call("open", name=name, version=1)["ok"]
        published = client.call("publish", **_args(name))["result"]["version"]
        assert client.call("publish", **_args(name))["ok"]
        held = _status(daemon)
        assert (held["reservations"], held["pins"]) == (base["reservations"] + 1, base["pins"] + 1)
        assert len(held["published"]) == len(base["published"]) + 2
        pin = reader.call("open", name=name, version=published)["result"]["pin"]
        if op == "wait":
            client.send({"id": 9, "op": "wait", "args": {"name": name, "after": 99, "timeout": 300}})
        else:
            client.send({"id": 9, "op": "unpublish", "args": {"name": name, "version": published, "timeout": 300}})
        time.sleep(0.5)  # the daemon is waiting
        client.close()
        t0 = time.monotonic()
        gone = (base["reservations"], base["published"], base["pins"] + 1)  # the reader's pin stays
        status = _settled(daemon, lambda s: (s["reservations"], s["published"], s["pins"]) == gone)
        assert (status["reservations"], status["published"], status["pins"]) == gone
        assert time.monotonic() - t0 < 5
        released = reader.call("release", pin=pin)["result"]
        assert released == {"released": True, "intact": False}  # its publisher's memory was withdrawn
    finally:
        client.close()
        reader.close()
