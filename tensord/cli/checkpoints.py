"""Client-side load and export: checkpoint files to and from a daemon, through an ``sdk.Client``.

A load runs the daemon's own pipeline (``tensord.ingest.pipeline.load``) over a ``ClientSink``:
the daemon reserves slabs, this process reads the files straight into them, then commits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tensord.checkpoint import TENSORD_TO_SAFETENSORS
from tensord.export import write_safetensors
from tensord.ingest.pipeline import load
from tensord.sharding import ShardRules
from tensord_contract.errors import InvalidArgument
from tensord_contract.manifest import Manifest, Table, TensorSpec
from tensord_contract.names import check_name

if TYPE_CHECKING:
    import torch

    from sdk.client import Client, Reservation
    from tensord_dataplane.slab import SlabAccess


class ClientSink:
    """A ``pipeline.Sink`` over an ``sdk.Client``: the daemon reserves, this process writes."""

    def __init__(self, client: Client) -> None:
        self.client = client

    @contextmanager
    def reserve(self, name: str, table: Table, *, device: str, origin: str) -> Iterator[_Reserved]:
        with self.client.reserve(name, table, device=device, origin=origin) as reservation:
            yield _Reserved(reservation)


class _Reserved:
    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation

    @property
    def manifest(self) -> Manifest:
        return self.reservation.manifest

    @property
    def slab(self) -> SlabAccess:
        return self.reservation.slab

    def commit(self, fingerprints: Sequence[int]) -> int:
        self.reservation.written_all(np.arange(len(fingerprints)), np.array(fingerprints, dtype=np.uint64))
        return self.reservation.commit()


def load_checkpoint(
    client: Client,
    path: str | Path,
    name: str,
    *,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
) -> tuple[int, int]:
    """Load a .safetensors file or a Hugging Face directory as the next version of `name`.

    Every header and file is validated before anything is reserved; the version appears only
    when every byte is written. Returns (version, bytes of tensor data).
    """
    loaded = load(ClientSink(client), path, name, device=device, threads=threads, progress=progress)
    return loaded.sets[0][1], loaded.nbytes


def load_sharded(
    client: Client,
    path: str | Path,
    name: str,
    *,
    tp: int,
    rules: ShardRules,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = False,
) -> list[tuple[str, int]]:
    """Load a checkpoint split for tensor parallelism: sets ``name/tp0`` … ``name/tp{tp-1}``.

    Every tensor is planned for every rank first (a dim that does not divide fails here);
    then every rank is reserved and written, and only then are they committed. On failure the
    reservations not yet committed are aborted. Returns [(set name, version)] by rank.
    """
    if tp is None:
        raise InvalidArgument("tp must be a positive int, not None")
    sink = ClientSink(client)
    return load(sink, path, name, tp=tp, rules=rules, device=device, threads=threads, progress=progress).sets


def export_set(client: Client, name: str, path: str | Path, *, version: int | str | None = None) -> int:
    """Write one version of a set to a .safetensors file, one tensor at a time; its version.

    The file appears atomically (see ``tensord.export``). Host replicas on this node are read
    through a mount, zero-copy; others one tensor at a time with ``get``.
    """
    info = client.info(check_name(name), version, tensors=True)
    v = int(info["version"])  # resolved once: every tensor comes from this version
    tensors: dict[str, Any] = info["tensors"]
    bad = [(k, t["dtype"]) for k, t in tensors.items() if t["dtype"] not in TENSORD_TO_SAFETENSORS]
    if bad:
        raise InvalidArgument(
            f"{name} v{v}: tensor {bad[0][0]!r} has dtype {bad[0][1]}, which safetensors cannot store",
            name=name,
            version=v,
            tensor=bad[0][0],
        )
    specs = [TensorSpec(k, t["dtype"], tuple(t["shape"])) for k, t in tensors.items()]
    metadata = {"format": "pt", "tensord.name": name, "tensord.version": str(v)}
    if info.get("device") == "cpu":
        with client.mount(name, v) as m:
            write_safetensors(path, lambda: ((k, m.tensors[k]) for k in tensors), metadata, specs=specs)
    else:

        def one_by_one() -> Iterator[tuple[str, torch.Tensor]]:
            for k in tensors:
                yield k, client.get(name, v, device="cpu", names=[k])[k]

        write_safetensors(path, one_by_one, metadata, specs=specs)
    return v
