"""One lifecycle per version under concurrency (real daemons, real files): eviction racing
`open`, and deletes racing reconcile. A version is pinned only while live, freed once, and an
evicted version stays listed, marked evicted, readable again from its checkpoint; `used` always
equals the bytes held."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdk
from tensord.state import Catalogue, VersionCounters
from tensord_dataplane.transport.mooncake import available
from tests.daemons import DaemonProcess
from tests.data import random_tensor, same_bits
from tests.etcd_server import free_port

MIB = 1 << 20


def _checkpoints(tmp_path: Path, count: int, mib: int) -> list[Path]:
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = models / f"m{i}.safetensors"
        save_file({"w": random_tensor(torch.float32, (mib * MIB // 4,), seed=i)}, path)
        paths.append(path)
    return paths


def _held_bytes(c: sdk.Client) -> int:
    """Bytes of the versions this node holds, from what it lists."""
    infos = [c.info(s["name"], v) for s in c.ls() for v in s["versions"]]
    return sum(i["slab_bytes"] for i in infos if i["device"] is not None)


def test_eviction_racing_open_never_hands_out_a_freed_version(start_daemon, tmp_path: Path) -> None:
    """A 10 MiB budget, three 3 MiB checkpoint sets read by three readers while a writer's
    puts force evictions: every read is bit-exact or OutOfCapacity (all pinned), never
    NotFound or a closed descriptor, and afterwards every set is held or marked evicted."""
    files = _checkpoints(tmp_path, 3, 3)
    expected = [load_file(p)["w"] for p in files]
    config = (
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        '[memory]\nbudgets = { cpu = "10MiB" }\neviction = "lru"\nhuge_pages = false\n'
        f'[ingest]\nallowed_roots = ["{tmp_path / "models"}"]\n'
    )
    d = start_daemon("racing", config=config)
    with d.client() as c:
        for i, path in enumerate(files):
            assert c.load_checkpoint(str(path), f"file/{i}") == 1
    failures: list[BaseException] = []
    reads = [0]
    stop = time.monotonic() + 8

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        with d.client() as c:
            while time.monotonic() < stop:
                i = rng.randrange(3)
                try:
                    got = c.get(f"file/{i}", verify=True)["w"]
                except sdk.OutOfCapacity:
                    continue
                except BaseException as exc:
                    failures.append(exc)
                    continue
                if not same_bits(got, expected[i]):
                    failures.append(AssertionError(f"file/{i}: wrong bytes"))
                reads[0] += 1

    def writer() -> None:
        with d.client() as c:
            while time.monotonic() < stop:
                try:
                    c.put("scratch", {"w": torch.full((3 * MIB // 4,), 1.0)})
                    c.delete("scratch")
                except sdk.OutOfCapacity:
                    time.sleep(0.01)
                except BaseException as exc:
                    failures.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == [], failures[:5]
    assert reads[0] > 10
    with d.client() as c:
        for i in range(3):
            info = c.info(f"file/{i}")
            assert info["versions"] == [1]
            assert (info["device"] is not None) != info["evicted"], info  # held, or marked evicted
            assert same_bits(c.get(f"file/{i}", verify=True)["w"], expected[i])
        assert c.status()["devices"]["cpu"]["used"] == _held_bytes(c)
    assert "Bad file descriptor" not in d.log.read_text()


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    """`path` made immutable (chattr +i: even root cannot add or remove files in it)."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_delete_that_cannot_be_recorded_is_refused_and_stays_refused(start_daemon, tmp_path: Path) -> None:
    state = tmp_path / "state"
    d = start_daemon("readonly", config=f'[daemon]\nstate_dir = "{state}"\n')
    with d.client() as c:
        assert c.put("kept", {"x": torch.ones(4)}) == 1
        with _immutable(state / "held"):
            with pytest.raises(sdk.Unavailable, match="cannot remove the record of kept v1"):
                c.delete("kept")
            assert c.info("kept")["versions"] == [1]  # refused: nothing changed
            assert torch.equal(c.get("kept")["x"], torch.ones(4))
            d.kill()
            with pytest.raises(RuntimeError, match=f"state directory {state / 'held'} cannot be written"):
                d.start()  # fails loudly at start rather than serve deletes that come back
    d.start()
    with d.client() as c:
        assert c.info("kept")["versions"] == [1]  # the refused delete did not happen
        assert c.delete("kept") == 1
    d.kill()
    d.start()
    with d.client() as c:
        assert c.ls() == []  # an acknowledged delete stays deleted


def test_startup_skips_damaged_records_and_names_a_damaged_counter(start_daemon, tmp_path: Path) -> None:
    """A truncated record and one that is a link to a FIFO are skipped (logged) and the rest
    served, versions going on; a damaged counter file, or one that is a link to a FIFO, and a
    lock replaced by a directory stop the start at once, naming the file. Nothing hangs."""
    state = tmp_path / "state"
    d = start_daemon("damaged", config=f'[daemon]\nstate_dir = "{state}"\n')
    with d.client() as c:
        for name in ("a", "b", "c"):
            assert c.put(name, {"x": torch.ones(4)}) == 1
    d.kill()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    truncated, linked = (state / "held" / Catalogue.filename(name, 1) for name in ("a", "b"))
    truncated.write_bytes(truncated.read_bytes()[:20])
    linked.unlink()
    linked.symlink_to(fifo)
    d.start(timeout=60)  # a FIFO read would hang here
    with d.client() as c:
        assert [s["name"] for s in c.ls()] == ["c"]  # listed (lost: a put has no file)
        assert c.put("a", {"x": torch.ones(4)}) == 2  # its number is not reused
        assert c.put("b", {"x": torch.ones(4)}) == 2
    log = d.log.read_text()
    assert f"skipped: state file {truncated} is not valid msgpack" in log
    assert f"skipped: state file {linked} cannot be read (a symbolic link" in log
    d.kill()

    bucket = state / "versions" / f"{VersionCounters.bucket('a')}.json"
    good = bucket.read_bytes()
    bucket.write_bytes(good[: len(good) // 2])
    with pytest.raises(RuntimeError, match=f"state file {bucket} is not valid JSON"):
        d.start(timeout=60)
    bucket.unlink()
    bucket.symlink_to(fifo)
    with pytest.raises(RuntimeError, match=f"state file {bucket} cannot be read"):
        d.start(timeout=60)
    bucket.unlink()
    bucket.write_bytes(good)
    (state / "lock").unlink()
    (state / "lock").mkdir()
    with pytest.raises(RuntimeError, match=f"cannot open its lock file {state / 'lock'}"):
        d.start(timeout=60)
    (state / "lock").rmdir()
    d.start()
    with d.client() as c:
        assert c.put("a", {"x": torch.ones(4)}) == 3


@pytest.mark.skipif(not available("tcp")[0], reason="Mooncake TE over TCP unavailable")
def test_a_put_delete_replicate_storm_leaves_used_equal_to_the_bytes_held(tmp_path: Path, etcd) -> None:
    """Two nodes; sets put on one, replicated to the other, deleted through either while the
    other's reconcile (every lease TTL) retires what left the registry: a version is released
    once, so each node's `used` ends equal to the bytes it holds."""
    nodes = {}
    for node in ("sa", "sb"):
        config = (
            f'[daemon]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[registry]\netcd_endpoints = ["{etcd.endpoint}"]\nprefix = "/storm/"\nlease_ttl = 1\n'
            '[transport]\nprotocol = "tcp"\n'
        )
        nodes[node] = DaemonProcess(tmp_path, node, config).start()
    failures: list[BaseException] = []
    stop = time.monotonic() + 12

    def storm(seed: int) -> None:
        rng = random.Random(seed)
        with nodes["sa"].client() as a, nodes["sb"].client() as b:
            while time.monotonic() < stop:
                name = f"storm/{seed}/{rng.randrange(12)}"
                try:
                    version = a.put(name, {"w": torch.full((16_384,), float(seed))})
                    a.replicate(name, version, to="sb")
                    if rng.random() < 0.7:
                        rng.choice((a, b)).delete(name, version)
                except (sdk.NotFound, sdk.TransferError):
                    pass  # deleted meanwhile by another thread
                except BaseException as exc:
                    failures.append(exc)

    try:
        threads = [threading.Thread(target=storm, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert failures == [], failures[:5]
        time.sleep(3)  # reconcile has run on both since the last delete
        for d in nodes.values():
            with d.client() as c:
                status = c.status()
                assert status["pins"] == 0 and status["reservations"] == 0
                assert status["devices"]["cpu"]["used"] == _held_bytes(c), d.node
    finally:
        for d in nodes.values():
            d.kill()
