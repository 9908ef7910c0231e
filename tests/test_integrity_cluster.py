"""Wrong bytes under a committed name and version, across nodes: a node advertised in the
registry that holds other bytes (the committed tensors changed in ways the old linear
fingerprint let through: rows swapped, compensating sign flips, bf16 groups swapped) is never
served as the committed version, nor pulled. Real etcd, three daemons on loopback, Mooncake TCP.

The liar `a` is made the honest way a broken node could: it runs against its own registry
prefix, puts the other bytes there as v1, and its node and replica records are then copied
into the shared prefix, where `b` committed the real v1. `c` is the gateway readers use."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aetcd
import numpy as np
import pytest
import torch

import sdk
from tensord_contract.manifest import Table
from tensord_dataplane.fingerprint import fingerprint
from tensord_dataplane.tensors import as_bytes
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.etcd_server import EtcdServer, free_port
from tests.frames import Raw

pytestmark = pytest.mark.skipif(not available("tcp")[0], reason=f"Mooncake TE unavailable: {available('tcp')[1]}")

TOKEN = "integrity-secret"
SHARED, OWN = "/integrity/", "/integrity-liar/"
NAME = "trust/rows"


def _config(etcd: EtcdServer, prefix: str) -> str:
    return (
        f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\ntoken = "{TOKEN}"\n'
        f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nlease_ttl = 2.0\nprefix = "{prefix}"\n'
        '[transport]\nprotocol = "tcp"\n'
    )


def _committed(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    shape, dtype = {"trust/rows": ((64, 2), torch.float32), "trust/signs": ((64,), torch.float32)}.get(
        name, ((64,), torch.bfloat16)
    )
    return {"rows": torch.randn(shape, generator=g).to(dtype), "w": torch.randn(3000, generator=g).bfloat16()}


def _changed(name: str) -> dict[str, torch.Tensor]:
    """The committed tensors of `name` with one change the old definition missed."""
    out = {k: v.clone() for k, v in _committed(name).items()}
    rows = out["rows"]
    if name == "trust/rows":
        rows[[0, 1]] = rows[[1, 0]].clone()
    elif name == "trust/signs":
        rows[[1, 3]] = -rows[[1, 3]]
    else:
        rows[0:4], rows[4:8] = rows[4:8].clone(), rows[0:4].clone()
    return out


NAMES = ["trust/rows", "trust/signs", "trust/groups"]


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(torch.equal(as_bytes(got[k]), as_bytes(want[k])) for k in want)


async def _advertise(etcd: EtcdServer, node: str) -> None:
    """Copy `node`'s node record and replica records from its own prefix into the shared one."""
    client = aetcd.Client("127.0.0.1", etcd.client_port, timeout=5)
    try:
        found = await client.get(f"{OWN}nodes/{node}".encode())
        assert found is not None
        await client.put(f"{SHARED}nodes/{node}".encode(), found.value)
        copied = 0
        for kv in await client.get_prefix(f"{OWN}sets/trust/".encode()):
            if b"/@r/" in kv.key:
                await client.put(SHARED.encode() + kv.key[len(OWN) :], kv.value)
                copied += 1
        assert copied == len(NAMES)
    finally:
        await client.close()


@pytest.fixture
def nodes(etcd: EtcdServer, tmp_path: Path):
    started: dict[str, DaemonProcess] = {}
    yield started, tmp_path
    for d in started.values():
        d.kill()


def test_a_verified_read_checks_the_registrys_manifest_not_the_holders(etcd: EtcdServer, nodes) -> None:
    started, tmp_path = nodes
    for name in NAMES:  # the old linear definition could not tell these apart; the current one does
        before, after = _committed(name)["rows"], _changed(name)["rows"]
        assert fingerprint(before, version=2) == fingerprint(after, version=2), name
        assert fingerprint(before) != fingerprint(after), name
    committed = _committed(NAME)
    for node, prefix in (("a", OWN), ("b", SHARED), ("c", SHARED)):
        started[node] = DaemonProcess(tmp_path, node, _config(etcd, prefix)).start()
    with started["a"].client() as a, started["b"].client() as b:
        for name in NAMES:
            assert a.put(name, _changed(name)) == 1  # v1 in the liar's own registry
            assert b.put(name, _committed(name)) == 1  # the committed v1
    asyncio.run(_advertise(etcd, "a"))

    with started["c"].client() as c:
        replicas = {r["node"] for r in c.info(NAME)["replicas"]}
        assert replicas == {"a", "b"}, replicas
        for _ in range(3):  # the liar is listed first: it is refused, b serves
            assert _same(c.get(NAME, 1, verify=True), committed)
            assert _same(c.get(NAME, 1), committed)
        rows = torch.empty(64, 2)
        c.load_into({"rows": rows}, NAME, 1, strict=False, verify=True)
        assert torch.equal(rows, committed["rows"])

    started.pop("b").kill()  # only the liar is left
    with started["c"].client() as c:
        deadline = time.monotonic() + 30
        while {r["node"] for r in c.info(NAME)["replicas"]} != {"a"}:
            assert time.monotonic() < deadline, "b's replica did not leave the registry"
            time.sleep(0.2)
        for name in NAMES:
            for verify in (True, False):
                with pytest.raises((sdk.IntegrityError, sdk.TransferError)):
                    c.get(name, 1, verify=verify)
            # a pull from the liar checks the registry's fingerprints: never promoted to a replica
            with pytest.raises(sdk.TransferError):
                c.replicate(name, 1, to="c")
            assert {r["node"] for r in c.info(name)["replicas"]} == {"a"}


def test_a_version_of_the_old_definition_is_pulled_and_read_under_it(etcd: EtcdServer, nodes) -> None:
    """A version committed by a client of definition 2 (put_commit without `fp`): its manifest
    says so, and a pull to another node and verified reads through a gateway check it under 2."""
    started, tmp_path = nodes
    for node in ("d", "e"):
        started[node] = DaemonProcess(tmp_path, node, _config(etcd, SHARED)).start()
    raw = Raw(started["d"].socket)
    try:
        table = Table.build(["x"], ["float32"], [[1000]]).to_wire()
        begun = raw.call("put_begin", name="old/pulled", device="cpu", tensors=table)
        assert begun["ok"], begun
        zeros = np.array([fingerprint(torch.zeros(1000), version=2)], dtype="<u8").tobytes()  # a fresh slab is zeros
        done = raw.call("put_commit", reservation=begun["result"]["reservation"], fingerprints=zeros)
        assert done["ok"] and done["result"]["version"] == 1, done
    finally:
        raw.close()
    with started["e"].client() as e:
        assert torch.equal(e.get("old/pulled", 1, verify=True)["x"], torch.zeros(1000))  # through the gateway
        assert e.replicate("old/pulled", 1, to="e")["node"] == "e"
        assert torch.equal(e.get("old/pulled", 1, verify=True)["x"], torch.zeros(1000))  # its own replica
