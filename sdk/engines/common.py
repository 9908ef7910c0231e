"""What every engine integration shares, with no engine imported: options, finding a model's
set, reading it into a model, publishing what an engine loaded, and receiving RL updates.

Two kinds of sets feed an engine:

- a **whole set** ``NAME``: the checkpoint as a trainer or ``tensord load`` wrote it (Hugging
  Face names, full shapes). Every rank reads it and the engine's own ``load_weights`` fuses,
  shards and converts, exactly as it does for the checkpoint's files;
- a **rank set** ``NAME/tp{rank}``: one rank's parameters in the engine's own layout (the names
  and shapes of ``model.state_dict()`` for that rank and tensor-parallel size, before the engine
  repacks them for its kernels). It is copied straight into the parameters, one copy, no
  conversion. Engines write them with ``publish="params"``.

A rank set wins when it was derived from the version of ``NAME`` asked for (`derived`).
Everything here uses the public SDK only (``sdk.Client``: ``info``, ``mount``, ``get``,
``load_into``, ``reserve``, ``publish``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

import sdk
from sdk.engines.derived import Derivation, EngineKey, find_rank_version, put_derived
from tensord_contract.errors import InvalidArgument, NotFound, TensordError

log = logging.getLogger(__name__)

#: How a model takes checkpoint tensors: an engine model's ``load_weights`` (vLLM, SGLang).
LoadWeights = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is told about its set (vLLM: ``--model-loader-extra-config``).

    `name`: the set (whole) or the prefix of the rank sets ``NAME/tp{rank}``. `version`: a
    version number or "latest" (default). `strict`: fail when the set is missing instead of
    loading the model's files. `publish`: ``True``/"checkpoint" (default): after a load from
    files, the first rank puts the checkpoint tensors it read as ``NAME``; "in-place": like
    "params" but without a copy, published where they lie once the engine's post-processing is
    done, when it left them unchanged (`sdk.engines.final`); "params": after a load
    from files or from the whole set, every rank puts its parameters as ``NAME/tp{rank}`` (the
    next engine of the same shape copies them straight in); ``False``: nothing. `socket`/`address`/`token`: the
    daemon (default: ``TENSORD_SOCKET`` / ``TENSORD_ADDR`` / ``TENSORD_TOKEN``). `verify`:
    check every tensor's fingerprint after the read. `mount`: the engine's parameters are
    zero-copy views of its post-processed engine set ``NAME/tp{rank}/processed`` (the first
    engine of a key makes it); the default of `publish` is then ``False``.
    """

    name: str
    version: int | str | None = None
    strict: bool = False
    publish: bool | str | None = None  # None: "checkpoint", or nothing when mounting
    socket: str | None = None
    address: str | None = None
    token: str | None = None
    verify: bool = False
    mount: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> EngineOptions:
        """Validate a JSON-like mapping; unknown keys and wrong types are refused by name."""
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise InvalidArgument(f"tensord: unknown option(s) {unknown}; known: {sorted(known)}")
        name = config.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument('tensord: the option "name" (the set to load) is required')
        version = config.get("version")
        if version is not None and not isinstance(version, int | str):
            raise InvalidArgument(f'tensord: "version" must be an integer or "latest", not {version!r}')
        for key in ("strict", "verify", "mount"):
            if not isinstance(config.get(key, False), bool):
                raise InvalidArgument(f'tensord: "{key}" must be true or false')
        publish = config.get("publish")
        if publish not in (None, True, False, "checkpoint", "params", "in-place"):
            raise InvalidArgument(
                f'tensord: "publish" must be true, false, "checkpoint", "params" or "in-place", not {publish!r}'
            )
        for key in ("socket", "address", "token"):
            if config.get(key) is not None and not isinstance(config[key], str):
                raise InvalidArgument(f'tensord: "{key}" must be a string')
        return cls(**config)

    @property
    def publish_mode(self) -> str | None:
        """None, "checkpoint", "params" or "in-place"."""
        if self.publish is None:
            return None if self.mount else "checkpoint"
        if self.publish is True:
            return "checkpoint"
        return self.publish or None

    def client(self) -> sdk.Client:
        """A new client for these options (the caller closes it)."""
        return sdk.Client(self.socket, address=self.address, token=self.token)


def rank_set(name: str, rank: int) -> str:
    return f"{name}/tp{rank}"


def engine_set(name: str, rank: int) -> str:
    """The set of one rank's post-processed tensors, which engines in mount mode map."""
    return f"{rank_set(name, rank)}/processed"


@dataclass(frozen=True)
class Found:
    """A set found for one rank: ``kind`` is "rank" or "whole"."""

    kind: str
    name: str
    version: int
    nbytes: int


def locate(
    client: sdk.Client,
    name: str,
    version: int | str | None,
    *,
    rank: int,
    kinds: tuple[str, ...] = ("rank", "whole"),
    key: EngineKey | None = None,
) -> Found | None:
    """The rank set ``NAME/tp{rank}`` if a version of it was derived from the version of
    ``NAME`` asked for (by an engine of `key`, when given), else the whole set ``NAME``, else
    None (`kinds` limits the search). An unreachable daemon raises `sdk.Unavailable`."""
    whole: dict[str, Any] | None
    try:
        whole = client.info(name, version)
    except NotFound:
        whole = None
    if "rank" in kinds:
        if whole is not None:
            wanted: int | None = int(whole["version"])
        else:  # no whole set: a rank set derived from the version asked for (any, if "latest")
            wanted = version if isinstance(version, int) else None
        found = find_rank_version(client, rank_set(name, rank), name=name, version=wanted, key=key)
        if found is not None:
            return Found("rank", rank_set(name, rank), found[0], found[1])
    if "whole" in kinds and whole is not None:
        return Found("whole", name, int(whole["version"]), int(whole.get("nbytes") or 0))
    return None


@contextlib.contextmanager
def read_set(
    client: sdk.Client, name: str, version: int | str | None, *, device: torch.device | str, verify: bool = False
) -> Iterator[tuple[int, Mapping[str, torch.Tensor]]]:
    """The tensors of one version, valid until the block exits: zero-copy views of a replica on
    this node (`mount`), else a private copy read from another node onto `device` (`get`).
    `verify` checks every fingerprint first.

    Whoever copies out of them (an engine's ``load_weights``) makes the only copy when the set
    is on this node. GPU views alias the daemon's memory: read, never write them.
    """
    try:
        mount = client.mount(name, version)
    except InvalidArgument:  # no replica on this node: read it from where it lies
        got = client.get(name, version, device=device, verify=verify)
        yield got.version, got
        return
    with mount:
        if verify:
            mount.verify()
        yield mount.version, mount.tensors


def load_set(
    model: torch.nn.Module,
    options: EngineOptions,
    *,
    rank: int,
    device: torch.device | str,
    load_weights: LoadWeights | None = None,
    client: sdk.Client | None = None,
    kinds: tuple[str, ...] = ("rank", "whole"),
    key: EngineKey | None = None,
) -> Found:
    """Fill `model` from its set: a rank set straight into its parameters (`load_into`), a whole
    set through `load_weights` (default: ``model.load_weights``). Returns what was loaded.

    Raises `sdk.NotFound` when neither set exists and `sdk.Unavailable` when the daemon cannot
    be reached: the engine decides whether to fall back to its files (``options.strict``).
    """
    own = client is None
    c = options.client() if client is None else client
    try:
        found = locate(c, options.name, options.version, rank=rank, kinds=kinds, key=key)
        if found is None:
            wanted = " nor ".join(rank_set(options.name, rank) if k == "rank" else options.name for k in kinds)
            raise NotFound(
                f"tensord: {'neither ' if len(kinds) > 1 else ''}{wanted} "
                f"(version {options.version or 'latest'}) is in the store",
                name=options.name,
            )
        start = time.perf_counter()
        if found.kind == "rank":
            c.load_into(model, found.name, found.version, strict=True, verify=options.verify)
        else:
            loader = load_weights if load_weights is not None else _load_weights_of(model)
            with read_set(c, found.name, found.version, device=device, verify=options.verify) as (_, tensors):
                loader(tensors.items())
        seconds = time.perf_counter() - start
        log.info(
            "tensord: loaded %s v%d (%s set, %.3f GB) in %.2f s (%.2f GB/s)",
            found.name,
            found.version,
            found.kind,
            found.nbytes / 1e9,
            seconds,
            found.nbytes / 1e9 / max(seconds, 1e-9),
        )
        return found
    finally:
        if own:
            c.close()


def _load_weights_of(model: torch.nn.Module) -> LoadWeights:
    fn = getattr(model, "load_weights", None)
    if not callable(fn):
        raise InvalidArgument(f"{type(model).__name__} has no load_weights(weights): pass load_weights=")
    return fn


class Capture:
    """Passes checkpoint tensors through to a model's ``load_weights`` and keeps references to
    them, so that what an engine read from its files can be published afterwards. Costs no copy;
    the tensors stay alive until `publish` (or `clear`)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def wrap(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in weights:
            self.tensors[key] = tensor
            yield key, tensor

    def publish(self, client: sdk.Client, name: str) -> int | None:
        """Put the captured tensors as the next version of `name`; None (and a log line) on
        failure: publishing is a favour to the next engine, never a reason to fail this one."""
        tensors, self.tensors = self.tensors, {}
        return publish(client, name, tensors, what="checkpoint")

    def clear(self) -> None:
        self.tensors = {}


def publish(client: sdk.Client, name: str, tensors: Mapping[str, torch.Tensor], *, what: str) -> int | None:
    """`sdk.put` with a log line, logging (not raising) a failure."""
    if not tensors:
        return None
    start = time.perf_counter()
    try:
        version = client.put(name, {k: v.detach() for k, v in tensors.items()})
    except TensordError as exc:
        log.warning("tensord: could not publish %s as %s: %s", what, name, exc)
        return None
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    log.info(
        "tensord: published the %s as %s v%d (%.3f GB, %d tensors) in %.2f s",
        what,
        name,
        version,
        nbytes / 1e9,
        len(tensors),
        time.perf_counter() - start,
    )
    return version


def publish_params(
    model: torch.nn.Module,
    name: str,
    *,
    rank: int,
    client: sdk.Client,
    derived_from: Derivation,
    zero_copy: bool = False,
) -> int | None:
    """Publish one rank's parameters (``model.state_dict()``, engine layout) as ``NAME/tp{rank}``,
    recording `derived_from` (the set version or files they were loaded from and the engine's
    key) as the version's origin: loaders take the rank set only for that version.

    Call it before the engine repacks parameters for its kernels (vLLM: before
    ``process_weights_after_loading``). By default this copies them into a slab (a put).
    `zero_copy=True` advertises the parameters' own memory instead
    (`sdk.Client.publish`): readers read it, no second copy exists, and the
    version lives while `client` stays open. The engine then promises not to write the
    parameters until it unpublishes: `WeightUpdater.start()` unpublishes first (waiting for
    readers), and so does `unpublish_params`.
    """
    if not zero_copy:
        return put_derived(
            client, rank_set(name, rank), model.state_dict(), derived_from, what=f"rank {rank}'s parameters"
        )
    unpublish_params(model)
    start = time.perf_counter()
    publication = client.publish(rank_set(name, rank), model.state_dict(), origin=derived_from.to_origin())
    model.__dict__[_PUBLICATION] = publication  # not a module attribute: kept out of state_dict
    log.info(
        "tensord: published rank %d's parameters as %s v%d without a copy in %.3f s",
        rank,
        publication.name,
        publication.version,
        time.perf_counter() - start,
    )
    return publication.version


_PUBLICATION = "_tensord_publication"


def unpublish_params(model: torch.nn.Module, timeout: float | None = None) -> bool:
    """Withdraw the parameters `publish_params(zero_copy=True)` published, once readers let go
    (True; False after `timeout` s with readers left). Then the engine may write them."""
    publication = model.__dict__.pop(_PUBLICATION, None)
    if publication is None:
        return True
    drained = publication.unpublish(timeout)
    log.info(
        "tensord: withdrew %s v%d%s", publication.name, publication.version, "" if drained else " (readers cut off)"
    )
    return drained
