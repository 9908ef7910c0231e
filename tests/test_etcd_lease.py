"""The node's etcd lease as a session (`tensord.registry.etcd.lease`), against a real etcd:
lost when etcd is SIGKILLed for longer than its TTL and held again when etcd returns, re-granted
when etcd no longer has it, revoked on close (its keys go at once), and `status` says so."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aetcd
import pytest

from tensord.cli.catalogue import registry_line
from tensord.registry.base import NodeRecord, Replica
from tensord.registry.etcd import EtcdRegistry, connection
from tensord.registry.local import LocalRegistry
from tests.etcd_server import EtcdServer
from tests.test_registry import NODE, eventually, publish, replica

TTL = 2.0


def lease_is(reg: EtcdRegistry, state: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return reg.status()["lease"] == state

    return check


@pytest.fixture
async def reg(own_etcd: EtcdServer) -> AsyncIterator[EtcdRegistry]:
    r = EtcdRegistry([own_etcd.endpoint], prefix=f"/test-{uuid.uuid4().hex[:8]}/", lease_ttl=TTL, timeout=1.0)
    yield r
    await r.close()


@pytest.fixture
async def raw(own_etcd: EtcdServer) -> AsyncIterator[aetcd.Client]:
    client = aetcd.Client("127.0.0.1", own_etcd.client_port, timeout=5)
    yield client
    await client.close()


async def test_status_before_start_and_after_close(reg: EtcdRegistry, own_etcd: EtcdServer) -> None:
    assert reg.status() == {
        "kind": "etcd",
        "endpoint": own_etcd.endpoint,
        "lease": "none",
        "lease_id": None,
        "ttl": 0,
        "since_keepalive": None,
        "lost_count": 0,
        "keys": 0,
    }
    await reg.start(NODE)
    status = reg.status()
    assert status["lease"] == "held" and status["ttl"] == TTL and status["keys"] == 1
    assert status["lease_id"] == f"{reg.lease.id:x}" and 0 <= status["since_keepalive"] < TTL
    assert registry_line(status) == f"registry: etcd {own_etcd.endpoint}, lease held (ttl 2 s, lost 0 times)"
    await reg.close()
    assert reg.status()["lease"] == "none"
    assert LocalRegistry().status() == {"kind": "embedded"}
    assert registry_line(LocalRegistry().status()) == "registry: embedded"


async def test_lost_while_etcd_is_killed_and_held_again_when_it_returns(
    reg: EtcdRegistry, own_etcd: EtcdServer
) -> None:
    await reg.start(NODE)
    await publish(reg, "s")
    lost: list[float] = []
    reg.lease.on_lost(lambda: lost.append(time.monotonic()))
    first = reg.lease.id
    own_etcd.stop(kill=True)
    killed = time.monotonic()
    await eventually(lease_is(reg, "failing"), TTL, "the keepalive to fail")
    assert not reg.lease.lost.is_set()
    await asyncio.wait_for(reg.lease.lost.wait(), 2 * TTL)  # the awaitable form
    status = reg.status()
    assert status["lease"] == "lost" and status["lost_count"] == 1 and len(lost) == 1
    assert status["since_keepalive"] >= TTL  # not before a whole TTL went unanswered
    assert lost[0] - killed >= TTL * 2 / 3 - 0.1  # (the last answer came up to TTL/3 before the kill)
    own_etcd.start()
    await eventually(lease_is(reg, "held"), 10.0, "the lease to be held again")
    assert not reg.lease.lost.is_set() and reg.status()["lost_count"] == 1 and len(lost) == 1
    # etcd kept the lease across its restart (it extends every lease), so the same one holds
    assert reg.lease.id == first
    assert await reg.nodes() == [NODE] and await reg.replicas("s", 1) == [replica("s", 1)]
    await asyncio.sleep(TTL + 0.5)  # and it is kept alive again
    assert reg.status()["lease"] == "held" and await reg.nodes() == [NODE]


async def test_regranted_and_registered_again_when_etcd_lost_it(
    reg: EtcdRegistry, own_etcd: EtcdServer, raw: aetcd.Client
) -> None:
    await reg.start(NODE)
    await publish(reg, "s")
    lost: list[int | None] = []
    reg.lease.on_lost(lambda: lost.append(reg.lease.id))
    first = reg.lease.id
    assert first is not None
    await raw.revoke_lease(first)  # lost, and etcd dies before the keepalive notices
    own_etcd.stop(kill=True)
    await asyncio.wait_for(reg.lease.lost.wait(), 3 * TTL)
    assert reg.status()["lease"] == "lost" and lost == [first]
    own_etcd.start()
    await eventually(lease_is(reg, "held"), 10.0, "a new lease")
    assert reg.lease.id != first and reg.status()["lost_count"] == 1 and lost == [first]
    assert await reg.nodes() == [NODE] and await reg.replicas("s", 1) == [replica("s", 1)]
    info = await raw.get_lease_info(reg.lease.id)
    assert len(info.keys) == 2  # the node record and its replica, under the new lease


async def test_close_revokes_the_lease_and_its_keys_go_at_once(
    reg: EtcdRegistry, own_etcd: EtcdServer, raw: aetcd.Client
) -> None:
    other = EtcdRegistry([own_etcd.endpoint], prefix=reg._prefix, lease_ttl=30.0, timeout=1.0)
    try:
        await other.start(NodeRecord("n2"))
        await reg.start(NODE)  # checked at once after close, well inside its TTL: only the revoke removes them
        await publish(reg, "s")
        await reg.add_replica(Replica("s", 1, "n1", "cuda:0"))
        lease = reg.lease.id
        assert lease is not None and len((await raw.get_lease_info(lease)).keys) == 3
        await reg.close()
        assert reg.status()["lease"] == "none"
        assert [n.node for n in await other.nodes()] == ["n2"]
        assert await other.replicas("s", 1) == []
        assert await other.versions("s") == [1]  # the manifest is durable
        assert (await raw.get_lease_info(lease)).TTL == -1  # etcd has no such lease
    finally:
        await other.close()


def test_another_aetcd_version_is_reported(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(connection, "_version_checked", False)
    monkeypatch.setattr(connection.importlib.metadata, "version", lambda _: "9.9.9")
    with caplog.at_level(logging.WARNING, logger="tensord.registry.etcd"):
        connection._Client("127.0.0.1", 2379, credentials=None)
    assert any("aetcd 9.9.9" in r.getMessage() and connection.AETCD_VERSION in r.getMessage() for r in caplog.records)


def test_missing_aetcd_internals_are_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "_AETCD_INTERNALS", (*connection._AETCD_INTERNALS, "_gone_in_a_later_aetcd"))
    with pytest.raises(RuntimeError, match=r"_gone_in_a_later_aetcd.*written for aetcd"):
        connection._Client("127.0.0.1", 2379, credentials=None)
