"""Reads: `mount` (zero-copy, this node), `get` (a private copy) and `load_into` (into existing
tensors). A read from another node that fails, or whose pin is lost, fails over to another
replica of the same version (`sdk.failover`)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from sdk.checks import check_fingerprints, check_targets, distinct_targets
from sdk.failover import read_with_failover
from sdk.modules import entries
from sdk.plans import Copies, LoadPlan, Plans, keys_and_values
from sdk.replicas import Pin, ReplicaClient
from tensord_contract.bulk import paused_gc
from tensord_contract.errors import InvalidArgument, NotFound, TransferError
from tensord_contract.manifest import ALIGN, Manifest
from tensord_contract.names import check_version
from tensord_dataplane.fingerprint import fingerprints as fingerprints_of
from tensord_dataplane.remote import RemoteAccess
from tensord_dataplane.slab import SlabAccess
from tensord_dataplane.snapshot import Snapshot
from tensord_dataplane.tensors import describe
from tensord_dataplane.views import TensorMap

T = TypeVar("T")
Opened = tuple[Pin, Manifest, SlabAccess]
_MAX_REPLICAS = 8  # distinct replicas one read tries before giving up


class Mount:
    """Zero-copy views of one pinned version on this node; the pin lasts until `close()`.

    `tensors` is a `TensorMap` (a dict-like mapping; views are built on first use). Host memory
    is mapped copy-on-write: writing to a view changes only this process's copy, and the views
    stay readable after close. GPU memory is shared: views alias the daemon's slab (or, for a
    set published without a copy, the publisher's memory), so never write to them, and do not
    use them after close.
    """

    def __init__(self, client: ReplicaClient, pin: Pin, manifest: Manifest, slab: SlabAccess) -> None:
        self._client, self._slab = client, slab
        self._pin: Pin | None = pin
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.tensors = slab.views(manifest)

    def verify(self) -> None:
        """Check every tensor's fingerprint where the slab lies (IntegrityError on mismatch)."""
        if not self._pin:
            raise InvalidArgument("this mount is closed")
        check_fingerprints(self.manifest, None, self.tensors.fingerprints())

    def close(self) -> None:
        if self._pin:
            pin, self._pin = self._pin, None
            self._slab.close()
            self._client._release(pin)

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Loaded:
    """What a load_into wrote: the version, and the targets of `rows`, for the verify."""

    version: int
    rows: np.ndarray
    targets: list[torch.Tensor]
    picked: np.ndarray | None = None  # the indices of `targets` loaded (None: all)
    dense: tuple[torch.device, np.ndarray, np.ndarray] | None = None  # the plan's (device, pointers, sizes)

    def chosen(self) -> list[torch.Tensor]:
        if self.picked is None or len(self.picked) == len(self.targets):
            return self.targets
        return [self.targets[i] for i in self.picked.tolist()]


class Reads(ReplicaClient):
    """The read half of `sdk.Client`."""

    def _read(
        self,
        name: str,
        version: int | str | None,
        copy: Callable[[Manifest, SlabAccess], T],
        verify: Callable[[Manifest, T], None] | None = None,
        wanted: bool | None = True,
    ) -> T:
        """Pin a version, `copy` it out, release, `verify` the copy (`wanted` None: if the
        slab's reads are checked by default, a publication's). A read from another node
        whose bytes failed or whose pin was lost is retried on another replica, for the same
        version ("latest" resolves once, at the first open)."""
        if wanted is not None and not isinstance(wanted, bool):
            raise InvalidArgument(f"verify must be True, False or None, not {wanted!r:.40}")
        first = self._open(name, check_version(version))  # NotFound here: there is no such version
        resolved = first[1].version

        def others() -> Iterator[Opened]:
            exclude: list[str] = []
            opened = first
            while isinstance(opened[2], RemoteAccess):
                exclude.append(opened[2].node)
                try:
                    opened = self._open(name, resolved, exclude)
                except NotFound:  # no replica left that has not failed
                    return
                yield opened

        def read(opened: Opened) -> T:
            pin, manifest, slab = opened
            try:
                value = copy(manifest, slab)
            finally:
                try:
                    slab.finish()
                finally:
                    slab.close()
                    intact = self._release(pin, wait=isinstance(slab, RemoteAccess) or slab.revocable)
            if not intact and slab.revocable:
                raise TransferError(
                    f"{manifest.name} v{manifest.version} was withdrawn by the process that published it "
                    "during the read, so the bytes read may have changed: read it again"
                )
            if not intact:
                raise TransferError(f"the pin on node {_node(opened)} was lost during the read")
            return value

        return read_with_failover(
            itertools.chain([first], others()),
            read,
            None if verify is None else lambda opened, value: _verify(verify, wanted, opened, value),
            where=_node,
            may_fail_over=lambda opened: isinstance(opened[2], RemoteAccess),
            what=f"{name} v{resolved}",
            limit=_MAX_REPLICAS,
            name=name,
            version=resolved,
        )

    def mount(self, name: str, version: int | str | None = None) -> Mount:
        """Pin a version and map it zero-copy (same node only). Use as a context manager."""
        pin, manifest, slab = self._open(name, version, mount=True)  # type: ignore[arg-type]
        try:
            return Mount(self, pin, manifest, slab)
        except BaseException:
            slab.close()
            self._release(pin)
            raise

    def get(
        self,
        name: str,
        version: int | str | None = None,
        *,
        device: str | torch.device | None = None,
        names: list[str] | None = None,
        verify: bool | None = None,
    ) -> TensorMap:
        """A private copy of a version's tensors on `device`, as a dict-like `TensorMap`.

        The tensors are views of one buffer per call, filled with as few copies as the layout
        allows (one for a whole set on a GPU); keeping any of them keeps that buffer alive.
        Default device: cpu for a host replica, the current CUDA device for a GPU replica.
        `names` selects a subset; `verify` checks every fingerprint (IntegrityError on mismatch);
        None (the default) checks reads from a publication only (its publisher may withdraw it).
        """
        wanted = _check_names(names)
        chosen = _check_device(device)

        def copy(manifest: Manifest, slab: SlabAccess) -> TensorMap:
            target = _target_device(chosen, slab.device)
            rows = None if wanted is None else _rows(manifest, wanted)
            if rows is None:  # the whole slab, padding included: one run
                at, nbytes = manifest.offsets, manifest.nbytes
                runs = (np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([nbytes], np.int64))
            else:
                sizes = manifest.sizes[rows]
                at, nbytes = _packed(sizes)
                runs = _runs(manifest.offsets[rows], at, sizes)
            buf = torch.empty(max(nbytes, ALIGN), dtype=torch.uint8, device=target)
            if nbytes:
                slab.read_runs(buf, *runs)
            return TensorMap(manifest, buf, at, rows)

        def check(manifest: Manifest, tensors: TensorMap) -> None:
            check_fingerprints(manifest, tensors.rows, tensors.fingerprints())

        return self._read(name, version, copy, check, verify)

    def load_into(
        self,
        target: torch.nn.Module | Mapping[str, torch.Tensor],
        name: str,
        version: int | str | None = None,
        *,
        strict: bool = True,
        verify: bool | None = None,
    ) -> int:
        """Copy a version straight into existing tensors (a module's state_dict or a dict).

        Names, shapes and dtypes are checked first; on any mismatch nothing is written.
        `strict`: the names must match exactly; otherwise only common names are loaded.
        `verify` as for `get`. Returns the version loaded.
        """
        if not isinstance(strict, bool):
            raise InvalidArgument(f"strict must be True or False, not {strict!r:.40}")
        keys, values = keys_and_values(entries(target, "load_into"))  # a module: its parameters themselves

        def copy(manifest: Manifest, slab: SlabAccess) -> _Loaded:
            plan = self._plans.get("load", name)
            if not (isinstance(plan, LoadPlan) and plan.fits(keys, strict, values, manifest)):
                # checked only for a new plan: a kept plan's keys passed it, and comparing them
                # is a pointer check per key, where this reads every key object (~9 ms at 90k)
                if not set(map(type, keys)) <= {str}:  # one C-level pass
                    raise InvalidArgument("load_into needs tensors keyed by name (str)")
                snapshot = Snapshot.take(values)
                plan, done = _load_plan(manifest, keys, values, snapshot, strict=strict, slab=slab)
                if done:  # targets not all dense: copied the slow way, nothing to keep
                    return _Loaded(manifest.version, plan.rows, values, plan.picked)
                self._plans.keep("load", name, plan)
            plan.copies.read(slab)
            return _Loaded(manifest.version, plan.rows, values, plan.picked, plan.copies.single(len(plan.rows)))

        def check(manifest: Manifest, loaded: _Loaded) -> None:
            fps = fingerprints_of(loaded.chosen(), version=manifest.fp_version, dense=loaded.dense)
            check_fingerprints(manifest, loaded.rows, fps)

        return self._read(name, version, copy, check, verify).version

    @functools.cached_property
    def _plans(self) -> Plans:
        return Plans()


def _verify(check: Callable[[Manifest, T], None], wanted: bool | None, opened: Opened, value: T) -> None:
    if wanted or (wanted is None and opened[2].verify_by_default):
        check(opened[1], value)


def _load_plan(
    manifest: Manifest,
    keys: list[str],
    values: list[torch.Tensor],
    snapshot: Snapshot | None,
    *,
    strict: bool,
    slab: SlabAccess,
) -> tuple[LoadPlan, bool]:
    """Check the targets against the set (InvalidArgument, nothing written) and plan the copy;
    targets that are not all dense (or not snapshot) are copied here at once, those not dense
    through private copies: then True (the plan must not be kept)."""
    picked, rows = _match_rows(manifest, keys, strict=strict)
    every = len(picked) == len(values)
    dsts = values if every else [values[i] for i in picked.tolist()]
    d = describe(dsts, "targets", copy_sparse=False, known=snapshot if every else None)
    named = keys if every else [keys[i] for i in picked.tolist()]
    check_targets(manifest, rows, named, d)
    offsets, sizes = manifest.offsets[rows], manifest.sizes[rows]
    dense = np.flatnonzero(d.dense)
    once, tied = distinct_targets(manifest, rows, named, d, dense)
    copies = Copies.of(d, once, offsets, sizes)
    plan = LoadPlan(keys, strict, snapshot, manifest, picked, rows, copies, tied)
    if snapshot is not None and len(dense) == len(dsts):
        return plan, False
    copies.read(slab)
    for i in np.flatnonzero(~d.dense).tolist():  # rare: through a private copy, then copy_
        tmp = torch.empty(dsts[i].shape, dtype=dsts[i].dtype, device=dsts[i].device)
        slab.read_into(np.array([tmp.data_ptr()]), offsets[i : i + 1], sizes[i : i + 1], tmp.device)
        slab.finish()
        with torch.no_grad():  # a module's parameters may require grad
            dsts[i].copy_(tmp)
    return plan, True


def _node(opened: Opened) -> str:
    slab = opened[2]
    return slab.node if isinstance(slab, RemoteAccess) else "this node"


def _check_device(device: str | torch.device | None) -> torch.device | None:
    """The device `get` copies to, checked before anything is opened: cpu or a CUDA device of
    this process (None: chosen by where the version lies)."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"device {device!r:.40} is no torch device: {exc}") from None
    if d.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device {d}: get copies to cpu or cuda memory only")
    count = torch.cuda.device_count() if d.type == "cuda" and torch.cuda.is_available() else 0
    if d.type == "cuda" and not (count and (d.index or 0) < count):
        raise InvalidArgument(f"device {d} is not available to this process ({count} CUDA devices)")
    return d


def _target_device(device: torch.device | None, slab_device: str) -> torch.device:
    if device is not None:
        return device
    if slab_device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _check_names(names: list[str] | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InvalidArgument("names must be a list of tensor names")
    return list(names)


def _rows(manifest: Manifest, names: list[str]) -> np.ndarray:
    index = manifest.table.index
    missing = [n for n in names if n not in index]
    if missing:
        raise NotFound(f"{manifest.name} v{manifest.version} has no tensors {missing[:5]}")
    if len(set(names)) != len(names):
        raise InvalidArgument("names must not repeat")
    return np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))


def _packed(sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """Offsets packing tensors of these sizes at ALIGN boundaries, and the buffer size."""
    aligned = (sizes + ALIGN - 1) // ALIGN * ALIGN
    return np.cumsum(aligned) - aligned, int(aligned.sum())


def _runs(src: np.ndarray, at: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies from slab offsets `src` to buffer offsets `at`, merged where both sides continue
    alike across at most the padding between two tensors (the buffer is ours: its padding may
    take the slab's)."""
    order = np.argsort(src, kind="stable")
    s, a, n = src[order], at[order], sizes[order]
    if not len(s):
        return s, a, n
    join = np.zeros(len(s), dtype=bool)
    gap = s[1:] - (s[:-1] + n[:-1])
    join[1:] = (gap >= 0) & (gap < ALIGN) & (a[1:] - a[:-1] == s[1:] - s[:-1])
    first = np.flatnonzero(~join)
    last = np.append(first[1:], len(s)) - 1
    return s[first], a[first], s[last] + n[last] - s[first]


def _match_rows(manifest: Manifest, keys: list[str], *, strict: bool) -> tuple[np.ndarray, np.ndarray]:
    """The indices of the target names the set holds, and their rows."""
    names = manifest.table.names
    if keys == names:  # the set's own order (an engine's state_dict, as put): no lookups
        every = np.arange(len(keys), dtype=np.int64)
        return every, every
    index = manifest.table.index
    with paused_gc():
        rows = list(map(index.get, keys, itertools.repeat(-1)))
    if strict and (len(keys) != len(manifest) or -1 in rows):
        missing = sorted(set(keys) - set(manifest.names))
        unexpected = sorted(set(manifest.names) - set(keys))
        raise InvalidArgument(
            f"names differ from {manifest.name} v{manifest.version}: "
            f"missing in the set {missing[:5]}, not in the target {unexpected[:5]}"
        )
    arr = np.array(rows, dtype=np.int64)
    picked = np.flatnonzero(arr >= 0)
    return picked, arr[picked]
