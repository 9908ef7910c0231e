"""The registry contract, run against the embedded registry and against a real etcd.

The contract tests take the `registry` fixture (both backends). The etcd-only tests below them
kill nodes and etcd itself for real: a node process SIGKILLed, etcd SIGKILLed and restarted on
the same ports and data dir, a lease revoked under a live node.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aetcd
import numpy as np
import pytest

from tensord.registry.base import NodeRecord, Registry, Replica
from tensord.registry.etcd import EtcdRegistry
from tensord.registry.local import LocalRegistry
from tensord_contract.errors import NotFound, OutOfCapacity, Unavailable, VersionConflict
from tensord_contract.manifest import Manifest, Table
from tensord_contract.names import MAX_VERSION
from tests.etcd_server import EtcdServer

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
NODE = NodeRecord(
    "n1",
    host="10.0.0.1",
    control="tcp:10.0.0.1:7070",
    transport="10.0.0.1:15000",
    devices={"cpu": 1 << 30, "cuda:0": 80 << 30},
)
TTL = 2.0  # seconds, for the tests where a lease must run out


def manifest(name: str, version: int) -> Manifest:
    table = Table.build(["w"], ["float32"], [[4]])
    fps = np.array([version], dtype=np.uint64)
    return Manifest(
        name, version, table, np.zeros(1, np.int64), 256, fingerprints=fps, created=1.5, origin=f"test:{name}"
    )


def replica(name: str, version: int, node: str = "n1", device: str = "cpu") -> Replica:
    return Replica(
        name, version, node, device, transport=f"te-{node}", address=4096 * version, nbytes=256, generation=7
    )


async def publish(reg: Registry, name: str, node: str = "n1") -> int:
    version = await reg.allocate_version(name)
    await reg.commit(manifest(name, version), replica(name, version, node))
    return version


async def eventually(check: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await check()
            if result:
                return result
        except Unavailable:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def aclose(it: AsyncIterator[int]) -> None:
    await it.aclose()  # type: ignore[attr-defined]  # watch() is an async generator


async def take(it: AsyncIterator[int], n: int, timeout: float = 10.0) -> list[int]:
    return [await asyncio.wait_for(anext(it), timeout) for _ in range(n)]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/"


@pytest.fixture
async def make_etcd(prefix: str) -> AsyncIterator[Callable[..., EtcdRegistry]]:
    """Build EtcdRegistry instances sharing one prefix (several nodes of one cluster)."""
    made: list[EtcdRegistry] = []

    def make(server: EtcdServer, *, lease_ttl: float = 5.0, timeout: float = 2.0) -> EtcdRegistry:
        reg = EtcdRegistry([server.endpoint], prefix=prefix, lease_ttl=lease_ttl, timeout=timeout)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        await reg.close()


@pytest.fixture(params=["local", "etcd"])
async def registry(
    request: pytest.FixtureRequest, etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry]
) -> Registry:
    reg: Registry = LocalRegistry() if request.param == "local" else make_etcd(etcd)
    await reg.start(NODE)
    return reg


@pytest.fixture
async def raw(etcd: EtcdServer) -> AsyncIterator[aetcd.Client]:
    client = aetcd.Client("127.0.0.1", etcd.client_port, timeout=5)
    yield client
    await client.close()


# -- the contract -----------------------------------------------------------------------------


async def test_allocate_unique_and_increasing_under_concurrency(registry: Registry) -> None:
    got = await asyncio.gather(*(registry.allocate_version("m/tp0") for _ in range(40)))
    assert sorted(got) == list(range(1, 41))
    assert [await registry.allocate_version("m/tp0") for _ in range(3)] == [41, 42, 43]
    assert await registry.allocate_version("m") == 1  # per name: `m` is not `m/tp0`


async def test_commit_resolve_manifest(registry: Registry) -> None:
    with pytest.raises(NotFound):
        await registry.resolve("m/tp0")
    v1 = await publish(registry, "m/tp0")
    assert await registry.resolve("m/tp0") == v1 == 1
    assert await registry.resolve("m/tp0", 1) == 1
    assert await registry.manifest("m/tp0", 1) == manifest("m/tp0", 1)
    v2 = await publish(registry, "m/tp0")
    assert await registry.resolve("m/tp0") == v2 == 2
    assert await registry.manifest("m/tp0", 2) == manifest("m/tp0", 2)
    assert await registry.versions("m/tp0") == [1, 2]
    for missing in (("m/tp0", 3), ("m/tp0", 0), ("m", 1), ("nope", 1)):
        with pytest.raises(NotFound):
            await registry.resolve(*missing)
    for missing in (("m/tp0", 3), ("m/tp0", 0)):
        with pytest.raises(NotFound):
            await registry.manifest(*missing)
    assert await registry.versions("nope") == []
    assert await registry.versions("m") == []


async def test_manifest_of_unknown_name_is_not_found(registry: Registry) -> None:
    with pytest.raises(NotFound):
        await registry.manifest("nope", 1)


async def test_latest_moves_forward_only(registry: Registry) -> None:
    a, b = await registry.allocate_version("s"), await registry.allocate_version("s")
    await registry.commit(manifest("s", b), replica("s", b))
    await registry.commit(manifest("s", a), replica("s", a))  # the older one lands last
    assert await registry.resolve("s") == b


async def test_names_with_prefix_do_not_confuse_nested_sets(registry: Registry) -> None:
    # `a/v/1` and `a/r/1/n1` look like the keys of set `a` if names are not delimited
    for name in ("a", "a/b", "a/v/1", "a/r/1/n1", "ab", "b/c"):
        await publish(registry, name)
    await publish(registry, "a/b")
    await registry.allocate_version("zz")  # allocated, never committed: not a name
    assert await registry.names() == ["a", "a/b", "a/r/1/n1", "a/v/1", "ab", "b/c"]
    assert await registry.names("a") == ["a", "a/b", "a/r/1/n1", "a/v/1", "ab"]
    assert await registry.names("a/") == ["a/b", "a/r/1/n1", "a/v/1"]
    assert await registry.names("c") == []
    assert await registry.versions("a") == [1]
    assert await registry.versions("a/b") == [1, 2]
    assert await registry.replicas("a", 1) == [replica("a", 1)]
    assert await registry.delete_version("a", 1)
    assert await registry.names("a") == ["a/b", "a/r/1/n1", "a/v/1", "ab"]
    assert await registry.versions("a/v/1") == [1]
    assert await registry.replicas("a/r/1/n1", 1) == [replica("a/r/1/n1", 1)]


async def test_delete_version_and_latest_fallback(registry: Registry) -> None:
    for _ in range(3):
        await publish(registry, "s")
    await registry.add_replica(replica("s", 3, device="cuda:0"))
    assert await registry.delete_version("s", 3)
    assert not await registry.delete_version("s", 3)  # idempotent: False the second time
    assert not await registry.delete_version("nope", 1)
    assert await registry.versions("s") == [1, 2]
    assert await registry.resolve("s") == 2  # latest was deleted: the newest that remains
    assert await registry.replicas("s", 3) == []
    with pytest.raises(NotFound):
        await registry.manifest("s", 3)
    assert await publish(registry, "s") == 4  # versions are never reused
    assert await registry.resolve("s") == 4
    for v in (1, 2, 4):
        assert await registry.delete_version("s", v)
    with pytest.raises(NotFound):
        await registry.resolve("s")
    assert await registry.names() == []


async def test_replicas_add_remove(registry: Registry) -> None:
    await publish(registry, "s")
    extra = replica("s", 1, device="cuda:0")
    await registry.add_replica(extra)
    key = lambda r: r.device  # noqa: E731
    assert sorted(await registry.replicas("s", 1), key=key) == [replica("s", 1), extra]
    await registry.remove_replica("s", 1, "n1", "cpu")
    await registry.remove_replica("s", 1, "n1", "cpu")  # idempotent
    await registry.remove_replica("nope", 9, "n1", "cpu")
    assert await registry.replicas("s", 1) == [extra]
    with pytest.raises(NotFound):
        await registry.add_replica(replica("s", 2))
    with pytest.raises(NotFound):
        await registry.add_replica(replica("nope", 1))
    assert await registry.replicas("s", 2) == []
    assert await registry.replicas("nope", 1) == []


async def test_nodes(registry: Registry) -> None:
    assert await registry.nodes() == [NODE]


async def test_watch_delivers_every_version_in_order(registry: Registry) -> None:
    await publish(registry, "w")
    await publish(registry, "w")
    await publish(registry, "w/x")  # a nested set is not a version of `w`
    everything = registry.watch("w")
    later = registry.watch("w", after=2)
    assert await take(everything, 2) == [1, 2]  # committed before the watch began
    pending = asyncio.ensure_future(take(later, 3))

    async def writer() -> None:
        for _ in range(3):
            await publish(registry, "w")
            await asyncio.sleep(0)

    await writer()
    assert await take(everything, 3) == [3, 4, 5]
    assert await pending == [3, 4, 5]
    nothing_more = asyncio.ensure_future(anext(everything))
    await asyncio.sleep(0.2)
    assert not nothing_more.done()  # no duplicates
    nothing_more.cancel()
    with pytest.raises(asyncio.CancelledError):
        await nothing_more
    await aclose(later)


# -- etcd only --------------------------------------------------------------------------------


async def test_two_nodes_allocate_distinct_versions(etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry]) -> None:
    a, b = make_etcd(etcd), make_etcd(etcd)
    await a.start(NodeRecord("na"))
    await b.start(NodeRecord("nb"))
    got = await asyncio.gather(*(r.allocate_version("m") for r in (a, b) * 25))
    assert sorted(got) == list(range(1, 51))
    assert [n.node for n in await a.nodes()] == ["na", "nb"]
    # what one node commits, the other sees; replicas of both nodes stand side by side
    await a.commit(manifest("m", 3), replica("m", 3, "na"))
    await b.add_replica(replica("m", 3, "nb", "cuda:1"))
    assert await b.resolve("m") == 3
    assert await b.replicas("m", 3) == [replica("m", 3, "na"), replica("m", 3, "nb", "cuda:1")]
    await b.close()
    assert [n.node for n in await a.nodes()] == ["na"]  # close revoked b's lease at once
    assert await a.replicas("m", 3) == [replica("m", 3, "na")]
    with pytest.raises(Unavailable):
        await b.versions("m")  # closed for good


async def test_commit_is_idempotent_and_detects_conflicts(
    etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry]
) -> None:
    reg = make_etcd(etcd)
    await reg.start(NODE)
    v = await publish(reg, "s")
    await reg.remove_replica("s", v, "n1", "cpu")
    await reg.commit(manifest("s", v), replica("s", v))  # a retried commit: the replica stands again
    assert await reg.replicas("s", v) == [replica("s", v)]
    other = Manifest("s", v, Table.build([], [], []), np.zeros(0, np.int64), 0, origin="someone else")
    with pytest.raises(VersionConflict):
        await reg.commit(other, replica("s", v))
    assert await reg.manifest("s", v) == manifest("s", v)


def _large(name: str, version: int, n: int = 100_000, seed: int = 0) -> Manifest:
    """A manifest of `n` tensors: several MB, compressed still over one etcd request."""
    names = [f"model.layers.{i // 600}.mlp.experts.{i % 600}.{seed}.weight" for i in range(n)]
    table = Table.build(names, ["float8_e4m3fn"] * n, [[i % 97 + 1, 128] for i in range(n)])
    offsets, nbytes = table.layout()
    fps = np.random.default_rng(seed).integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
    return Manifest(name, version, table, offsets, nbytes, fingerprints=fps, created=2.0, origin="big")


async def test_large_manifests_fit_etcd_default_limits(
    etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry]
) -> None:
    """A 100,000-tensor manifest commits in parts under etcd's default 1.5 MiB request limit,
    reads back whole, a conflicting commit leaves the winner's parts alone, delete removes all."""
    reg = make_etcd(etcd)
    await reg.start(NODE)
    v = await reg.allocate_version("big/set")
    big = _large("big/set", v)
    await reg.commit(big, replica("big/set", v))
    assert await reg.manifest("big/set", v) == big
    await reg.commit(big, replica("big/set", v))  # retried: fine
    with pytest.raises(VersionConflict):
        await reg.commit(_large("big/set", v, seed=1), replica("big/set", v))
    assert await reg.manifest("big/set", v) == big
    assert await reg.names("big") == ["big/set"]
    parts = f"{reg._prefix}sets/big/set/@p/".encode()
    with reg._etcd("test") as c:
        assert len(list(await c.get_prefix(parts, keys_only=True))) >= 2  # it did not fit one key
    assert await reg.delete_version("big/set", v)
    with reg._etcd("test") as c:
        assert list(await c.get_prefix(parts, keys_only=True)) == []


async def test_etcd_versions_stop_at_the_last_one_readers_decode(
    etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry]
) -> None:
    reg = make_etcd(etcd)
    await reg.start(NODE)
    key = reg._keys.next("last/set")
    with reg._etcd("test") as c:
        await c.put(key, str(MAX_VERSION).encode())
    assert await reg.allocate_version("last/set") == MAX_VERSION
    for _ in range(2):  # and never past it
        with pytest.raises(OutOfCapacity, match="used every version"):
            await reg.allocate_version("last/set")
    for garbage in (b"12x", b"-3", b"\xff", str(2**70).encode()):
        with reg._etcd("test") as c:
            await c.put(key, garbage)
        with pytest.raises(Unavailable, match="counter"):
            await reg.allocate_version("last/set")
    with reg._etcd("test") as c:
        await c.put(reg._keys.latest("last/set"), b"garbage")
    with pytest.raises(Unavailable, match="counter"):
        await reg.resolve("last/set")


_DOOMED_NODE = """
import asyncio, sys
import numpy as np
from tensord_contract.manifest import Manifest, Table
from tensord.registry.base import NodeRecord, Replica
from tensord.registry.etcd import EtcdRegistry

async def main():
    reg = EtcdRegistry([sys.argv[1]], prefix=sys.argv[2], lease_ttl=float(sys.argv[3]), timeout=2.0)
    await reg.start(NodeRecord("doomed"))
    v = await reg.allocate_version("doomed/set")
    empty = Manifest("doomed/set", v, Table.build([], [], []), np.zeros(0, np.int64), 0)
    await reg.commit(empty, Replica("doomed/set", v, "doomed", "cpu"))
    await reg.add_replica(Replica("shared", 1, "doomed", "cuda:0"))
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_killed_node_leaves_within_lease_ttl(
    etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry], prefix: str
) -> None:
    live = make_etcd(etcd)
    await live.start(NODE)
    await publish(live, "shared")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DOOMED_NODE,
        etcd.endpoint,
        prefix,
        str(TTL),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"ready\n"
        assert [n.node for n in await live.nodes()] == ["doomed", "n1"]
        assert len(await live.replicas("shared", 1)) == 2
        await asyncio.sleep(TTL)  # alive past one TTL: its keepalive works
        assert [n.node for n in await live.nodes()] == ["doomed", "n1"]
        proc.kill()
        killed = time.monotonic()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def gone() -> bool:
        return [n.node for n in await live.nodes()] == ["n1"] and not await live.replicas("doomed/set", 1)

    await eventually(gone, TTL + 2.0, "the killed node's lease to expire")
    assert time.monotonic() - killed >= TTL / 2  # it went by expiry (refreshed every TTL/3)
    assert await live.replicas("shared", 1) == [replica("shared", 1)]
    assert await live.versions("doomed/set") == [1]  # manifests are durable


async def test_lost_lease_is_granted_again_and_everything_put_back(
    etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry], raw: aetcd.Client, prefix: str
) -> None:
    reg, other = make_etcd(etcd, lease_ttl=TTL), make_etcd(etcd)
    await reg.start(NODE)
    await other.start(NodeRecord("n2"))
    await publish(reg, "s")
    await publish(reg, "s")
    await reg.add_replica(replica("s", 1, device="cuda:0"))
    await other.delete_version("s", 2)  # deleted by another node: must not come back
    node_key = f"{prefix}nodes/n1".encode()
    lease = (await raw.get(node_key)).lease
    await raw.revoke_lease(lease)  # as if it expired while this node was cut off
    assert [n.node for n in await other.nodes()] == ["n2"]
    assert await other.replicas("s", 1) == []

    async def back() -> bool:
        return NODE in await other.nodes() and len(await other.replicas("s", 1)) == 2

    await eventually(back, TTL, "the node to register again")
    assert (await raw.get(node_key)).lease != lease
    assert await other.replicas("s", 2) == []
    # and the new lease is kept alive
    await asyncio.sleep(TTL + 0.5)
    assert NODE in await other.nodes()


async def test_etcd_down_unavailable_then_recovers(
    own_etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry], prefix: str
) -> None:
    reg = make_etcd(own_etcd, lease_ttl=TTL, timeout=1.0)
    await reg.start(NODE)
    await publish(reg, "s")
    async with aetcd.Client("127.0.0.1", own_etcd.client_port, timeout=5) as raw:
        lease = (await raw.get(f"{prefix}nodes/n1".encode())).lease
        await raw.revoke_lease(lease)  # lost, and etcd dies before the keepalive notices
    own_etcd.stop(kill=True)

    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: reg.allocate_version("s"),
        lambda: reg.commit(manifest("s", 9), replica("s", 9)),
        lambda: reg.resolve("s"),
        lambda: reg.manifest("s", 1),
        lambda: reg.versions("s"),
        lambda: reg.names(),
        lambda: reg.delete_version("s", 1),
        lambda: reg.add_replica(replica("s", 1, device="cuda:0")),
        lambda: reg.remove_replica("s", 1, "n1", "cuda:9"),
        lambda: reg.replicas("s", 1),
        lambda: reg.nodes(),
    ]
    for op in operations:
        began = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await op()
        assert time.monotonic() - began < 2.0
        assert info.value.details["endpoint"] == own_etcd.endpoint
    await asyncio.sleep(TTL)  # down longer than the lease TTL

    own_etcd.start()
    assert await eventually(lambda: reg.versions("s"), 10.0, "etcd to answer again") == [1]
    assert await publish(reg, "s") == 2

    async def registered() -> bool:
        return await reg.nodes() == [NODE] and await reg.replicas("s", 1) == [replica("s", 1)]

    await eventually(registered, TTL + 2.0, "the node and its replicas to register again")
    await asyncio.sleep(TTL + 0.5)  # and they stay: the keepalive runs again
    assert await registered()


async def test_watch_survives_etcd_restart(own_etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry]) -> None:
    reg = make_etcd(own_etcd, timeout=1.0)
    await reg.start(NODE)
    await publish(reg, "w")
    it = reg.watch("w")
    assert await take(it, 1) == [1]
    waiting = asyncio.ensure_future(take(it, 2, timeout=15.0))  # blocked on the stream
    await asyncio.sleep(0.1)
    own_etcd.stop(kill=True)
    await asyncio.sleep(1.0)  # the watch retries against a dead etcd meanwhile
    own_etcd.start()
    await eventually(lambda: reg.allocate_version("w"), 10.0, "etcd to answer again")  # 2
    await reg.commit(manifest("w", 2), replica("w", 2))
    await publish(reg, "w")  # 3
    assert await waiting == [2, 3]
    await aclose(it)


async def test_watch_relists_after_compaction(
    own_etcd: EtcdServer, make_etcd: Callable[..., EtcdRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    reg = make_etcd(own_etcd, timeout=1.0)
    await reg.start(NODE)
    await publish(reg, "w")
    it = reg.watch("w")
    assert await take(it, 1) == [1]
    # the watcher is not iterating: its stream breaks, and the history it would resume from
    # is compacted away before it looks again
    own_etcd.restart(kill=True)
    await eventually(lambda: reg.versions("w"), 10.0, "etcd to answer again")
    await publish(reg, "w")
    await publish(reg, "w")
    async with aetcd.Client("127.0.0.1", own_etcd.client_port, timeout=5) as raw:
        head = (await raw.get_prefix(b"/", keys_only=True)).header.revision
        await raw.compact(head, physical=True)
    with caplog.at_level(logging.INFO, logger="tensord.registry.etcd"):
        assert await take(it, 2) == [2, 3]
    assert any("compacted" in r.getMessage() for r in caplog.records)
    await aclose(it)
