"""Tables named by their digest (`put_begin` and `publish` with `table_digest`) and publishes
of every kind of wrong, from raw frames: a malformed digest, a digest of a table of another
tensor count than the fingerprints or the published pieces, a published device that is no
device, a structured mutation fuzz of `publish`, and puts by digest racing puts of another
layout under the same name. Each refused request changes nothing; no reply is `internal`;
every version read back holds the bytes that were put."""

from __future__ import annotations

import contextlib
import copy
import random
import threading
import time
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

import sdk
from tensord_contract.manifest import table_of
from tests.frames import Raw, code, log_clean
from tests.test_publish import _EXPOSED, _args

THREE = table_of({"x": ("float32", (4,)), "y": ("float32", (2,)), "z": ("float32", (3,))})
TWO = table_of({"a": ("float32", (4,)), "b": ("float32", (2,))})  # `_args`' table


def _ok(reply: dict[str, Any]) -> Any:
    assert reply.get("ok"), reply
    return reply["result"]


def _state(raw: Raw) -> tuple[Any, ...]:
    status = _ok(raw.call("status"))
    published = [(p["name"], p["version"]) for p in status["published"]]
    return _ok(raw.call("ls")), status["reservations"], published, sorted(status["devices"])


@pytest.mark.parametrize("digest", ["x" * 32, 5, None, b"x" * 31, b"x" * 33, b"", [THREE.digest], {"d": 1}, 1.5])
def test_a_malformed_table_digest_is_refused_and_changes_nothing(daemon, raw: Raw, digest: Any) -> None:
    with daemon.client() as c:
        c.put("digest/bad", {"x": torch.ones(4), "y": torch.ones(2), "z": torch.ones(3)})
    before = _state(raw)
    assert code(raw.call("put_begin", name="digest/bad", device="cpu", table_digest=digest)) == "invalid_argument"
    publish = {k: v for k, v in _args("digest/bad").items() if k != "tensors"}
    assert code(raw.call("publish", **publish, table_digest=digest)) == "invalid_argument"
    both = raw.call("put_begin", name="digest/bad", device="cpu", table_digest=THREE.digest, tensors=THREE.to_wire())
    assert code(both) == "invalid_argument"
    assert _state(raw) == before
    log_clean(daemon.log)


def test_a_known_table_of_another_tensor_count_than_the_request_is_refused(daemon, raw: Raw) -> None:
    """The set's known table has three tensors; fingerprints or published pieces for two are
    refused, and a commit of two fingerprints leaves the reservation to commit rightly."""
    with daemon.client() as c:
        assert c.put("digest/count", {"x": torch.ones(4), "y": torch.ones(2), "z": torch.ones(3)}) == 1
    before = _state(raw)
    publish = {k: v for k, v in _args("digest/count").items() if k != "tensors"}
    assert code(raw.call("publish", **publish, table_digest=THREE.digest)) == "invalid_argument"  # 2 of 3
    three_fps = {**publish, "fingerprints": np.arange(3, dtype="<u8").tobytes()}
    assert code(raw.call("publish", **three_fps, table_digest=THREE.digest)) == "invalid_argument"  # 2 pieces
    assert _state(raw) == before
    rid = _ok(raw.call("put_begin", name="digest/count", device="cpu", table_digest=THREE.digest))["reservation"]
    two_fps = np.arange(2, dtype="<u8").tobytes()
    assert code(raw.call("put_commit", reservation=rid, fingerprints=two_fps, fp=3)) == "invalid_argument"
    assert _ok(raw.call("status"))["reservations"] == 1
    fps = np.arange(3, dtype="<u8").tobytes()
    assert _ok(raw.call("put_commit", reservation=rid, fingerprints=fps, fp=3))["version"] == 2
    assert _ok(raw.call("info", name="digest/count"))["count"] == 3
    log_clean(daemon.log)


@pytest.mark.parametrize("device", ["cuda:", "cuda:-1", "cuda:abc", "cuda:1x", "gpu", "cuda:\u0661", "CPU", "cpu\n"])
def test_a_published_device_that_is_no_device_is_refused(daemon, raw: Raw, device: str) -> None:
    before = _state(raw)
    reply = raw.call("publish", **_args("digest/device", replica=None, exposed={**_EXPOSED, "device": device}))
    assert code(reply) == "invalid_argument" and "device" in reply["error"]["message"]
    assert _state(raw) == before  # no device of that name shows up in status either


_VALUES = [0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 2**48, 1024, None, True, 0.5, float("nan"), float("inf"), "",
           "x" * 300, "cuda:0", "cpu", "a:1", b"", b"\0" * 8, b"\xff" * 64, [], [1], [b"x" * 64], {}, {"a": 1},
           [[[[1]]]], msgpack.ExtType(1, b"x")]  # fmt: skip


def test_mutated_publishes_get_no_internal_reply_and_leave_nothing(daemon) -> None:
    """Valid publishes (IPC or Transfer Engine, table sent or named by digest) with one or two
    values replaced or corrupted, on three connections; those that pass are unpublished or
    left to the connection's end. Nothing stays published; no reply is `internal`."""
    rng = random.Random(11)
    bases = [_args("digest/fuzz"), _args("digest/fuzz", replica=None, exposed=dict(_EXPOSED))]
    conns = [Raw(daemon.socket) for _ in range(3)]
    seen: dict[str, int] = {}
    for _ in range(1500):
        args = copy.deepcopy(rng.choice(bases))
        if rng.random() < 0.3:
            del args["tensors"]
            args["table_digest"] = TWO.digest
        for _ in range(rng.randint(1, 2)):
            target = args
            for sub in ("replica", "exposed"):
                if isinstance(args.get(sub), dict) and rng.random() < 0.5:
                    target = args[sub]
            key = rng.choice([*target, "more_sessions", "session_of", "fp", "origin", "extra"])
            value = rng.choice(_VALUES)
            if isinstance(target.get(key), bytes) and target[key] and rng.random() < 0.5:
                cut = bytearray(target[key])
                cut[rng.randrange(len(cut))] = rng.randrange(256)
                value = bytes(cut[: rng.randrange(len(cut) + 1)]) if rng.random() < 0.5 else bytes(cut)
            target[key] = value
        conn = rng.choice(conns)
        reply = conn.call("publish", **args)
        outcome = "ok" if reply["ok"] else reply["error"]["code"]
        assert outcome != "internal", (args, reply)
        seen[outcome] = seen.get(outcome, 0) + 1
        if reply["ok"] and "version" in reply["result"] and rng.random() < 0.5:
            _ok(conn.call("unpublish", name=args["name"], version=reply["result"]["version"], timeout=0))
    assert seen.get("ok", 0) > 50 and seen.get("invalid_argument", 0) > 500, seen
    for conn in conns:
        conn.close()
    with daemon.client() as c:
        deadline = time.monotonic() + 10
        while c.status()["published"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.status()["published"] == []
        assert not {"digest/fuzz", "cpu"} & {s["name"] for s in c.ls()}  # "cpu" is a name, too
    log_clean(daemon.log)


def test_puts_by_digest_racing_puts_of_another_layout_read_back_their_own_bytes(daemon) -> None:
    """Two clients put one name in turns of two layouts; each keeps its plan, so its puts name
    their table by digest, which the other's put keeps making unknown (asked for, sent again).
    Every version holds what its put wrote."""
    layouts = {
        "wide": {"x": torch.zeros(64), "y": torch.zeros(3, 5)},
        "long": {"x": torch.zeros(16), "y": torch.zeros(7), "z": torch.zeros(2, dtype=torch.int64)},
    }
    written: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def putter(layout: str, seed: int) -> None:
        tensors = layouts[layout]
        try:
            with daemon.client() as c:
                for step in range(25):
                    for i, t in enumerate(tensors.values()):
                        t.copy_(torch.arange(t.numel()).reshape(t.shape) * (seed + step + i))  # in place: a kept plan
                    want = {k: t.clone() for k, t in tensors.items()}
                    written[c.put("digest/race", tensors)] = want
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=putter, args=(layout, seed)) for seed, layout in enumerate(layouts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(written) == list(range(1, 51))
    with daemon.client() as c:
        for version, want in written.items():
            got = c.get("digest/race", version, verify=True)
            assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), version
    log_clean(daemon.log)


def test_puts_by_digest_racing_deletes_of_the_name_never_fail_or_mix_bytes(daemon) -> None:
    """One client puts a kept plan again and again (its table named by digest, known after the
    name's versions were deleted: the daemon remembers it), another deletes the name in a loop:
    every put succeeds with a new version, every read is its put's bytes or NotFound."""
    stop, errors, versions = threading.Event(), [], []

    def putter() -> None:
        tensors = {"x": torch.zeros(64), "y": torch.zeros(5, dtype=torch.int64)}
        try:
            with daemon.client() as c:
                for step in range(40):
                    for t in tensors.values():
                        t.fill_(step)
                    versions.append(c.put("digest/deleted", tensors))
                    try:
                        got = c.get("digest/deleted", versions[-1])
                    except sdk.NotFound:
                        continue
                    assert all(torch.equal(got[k], torch.full_like(v, step)) for k, v in tensors.items()), step
        except BaseException as exc:
            errors.append(exc)
        finally:
            stop.set()

    def deleter() -> None:
        with daemon.client() as c:
            while not stop.is_set():
                with contextlib.suppress(sdk.NotFound):
                    c.delete("digest/deleted")

    threads = [threading.Thread(target=putter), threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert versions == list(range(1, 41))
    with daemon.client() as c:
        assert c.status()["reservations"] == 0
    log_clean(daemon.log)
