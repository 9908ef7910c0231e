"""A daemon that lies: the client refuses manifests and descriptors that do not add up, with
ProtocolError, writes nothing into the caller's tensors, and gives the pin back."""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch

import sdk
from tensord_contract import wire
from tensord_contract.manifest import Manifest, Table
from tensord_contract.node_messages import StatusReply


def _manifest() -> Manifest:
    table = Table.build(["a", "b"], ["float32", "int16"], [[4, 4], [3]])
    offsets, nbytes = table.layout()
    return Manifest("liar/set", 3, table, offsets, nbytes, fingerprints=np.zeros(2, dtype=np.uint64))


class Liar:
    """Answers hello, then every open with `mutate(manifest wire, replica wire)`; counts releases."""

    def __init__(self, path: Path, mutate: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
        self.path, self.mutate, self.released = str(path), mutate, 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while True:
                header = conn.recv(4, socket.MSG_WAITALL)
                if len(header) < 4:
                    return
                request = msgpack.unpackb(conn.recv(struct.unpack(">I", header)[0], socket.MSG_WAITALL))
                op, fds = request["op"], []
                if op == "hello":
                    result: Any = {"protocol": wire.PROTOCOL_VERSION, "node": "liar", "version": "0", "transport": None}
                elif op == "open":
                    m = _manifest()
                    fd = os.memfd_create("liar")
                    os.ftruncate(fd, m.nbytes)
                    fds = [fd]
                    manifest, replica = dict(m.wire), {"kind": "host", "nbytes": m.nbytes, "generation": 7}
                    self.mutate(manifest, replica)
                    result = {"pin": 1, "version": 3, "manifest": manifest or None, "replica": replica}
                elif op == "release":
                    self.released += 1
                    result = {"released": True, "intact": True}
                elif op == "status":  # well-formed: the client checks a status reply's top level
                    result = StatusReply(
                        "liar", "0", 0.0, "", None, {}, 0, 0, 0, 0, 0, "none", 0, [], None, {}, [], None, {}, []
                    ).to_wire()
                else:
                    result = {}
                body = msgpack.packb({"id": request["id"], "ok": True, "result": result, "fds": len(fds)})
                data = struct.pack(">I", len(body)) + body
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
                conn.sendmsg([data], anc)
                for fd in fds:
                    os.close(fd)

    def close(self) -> None:
        self.listener.close()


def _i64(*v: int) -> bytes:
    return np.array(v, dtype="<i8").tobytes()


LIES: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "overlap": lambda m, r: m.update(offsets=_i64(0, 32)),
    "past-the-slab": lambda m, r: m.update(offsets=_i64(0, 1 << 30)),
    "size-not-shape": lambda m, r: m.update(sizes=_i64(64, 7)),
    "bad-dtype-code": lambda m, r: m.update(dtypes=bytes([2, 99])),
    "a-million-rows": lambda m, r: m.update(count=1_000_000),
    "other-set": lambda m, r: m.update(name="someone/else"),
    "other-version": lambda m, r: m.update(version=4),
    "no-fingerprints": lambda m, r: m.update(fingerprints=None),
    "manifest-larger-than-slab": lambda m, r: r.update(nbytes=256),
    "replica-kind": lambda m, r: r.update(kind="telepathy"),
    "left-out-but-not-cached": lambda m, r: m.clear(),
}


@pytest.fixture
def liar(tmp_path: Path) -> Iterator[Callable[..., Liar]]:
    made: list[Liar] = []

    def make(mutate: Callable[[dict[str, Any], dict[str, Any]], None]) -> Liar:
        made.append(Liar(tmp_path / "liar.sock", mutate))
        return made[-1]

    yield make
    for liar_ in made:
        liar_.close()


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lies_are_refused_and_change_nothing(liar, lie: str) -> None:
    fake = liar(LIES[lie])
    target = {"a": torch.full((4, 4), 5.0), "b": torch.full((3,), 9, dtype=torch.int16)}
    with sdk.Client(fake.path, timeout=10) as client:
        with pytest.raises(sdk.ProtocolError):
            client.load_into(target, "liar/set")
        assert torch.equal(target["a"], torch.full((4, 4), 5.0)) and torch.equal(target["b"], torch.full((3,), 9))
        client.status()  # the connection still works
    assert fake.released == 1  # the pin went back
