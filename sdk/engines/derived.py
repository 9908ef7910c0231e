"""Rank sets record what they were derived from, so that a loader never takes a stale one.

An engine that publishes its parameters as ``NAME/tp{rank}`` writes a `Derivation` into the
version's ``origin`` (shown by ``tensord info``): the whole set and version it loaded (or the
model's files), and the `EngineKey` of the engine that converted them (engine and version,
tensor-parallel size and rank, dtype, quantization). A loader takes a rank set only when it
was derived from the version of ``NAME`` it was asked for, by an engine of the same key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

import sdk
from tensord_contract.derivation import FILES, Derivation, EngineKey
from tensord_contract.errors import NotFound

log = logging.getLogger("sdk.engines")

#: How many versions of a rank set are looked at for one derived from the version asked for.
SCAN_VERSIONS = 8


def fits(
    derivation: Derivation | None,
    *,
    name: str,
    version: int | None,
    key: EngineKey | None,
    platform: str | None = None,
) -> str | None:
    """None when a rank set of this derivation may feed an engine of `key` asked for `name` at
    `version` (None: the whole set does not exist, so a derivation from the model's files, or
    from any version of `name`, is taken); else why not. `platform`: the set must have been
    post-processed for it (None: it must not have been post-processed at all)."""
    if derivation is None:
        return "it records no derivation"
    if key is not None and derivation.key != key:
        return f"it was derived by another engine ({derivation.describe()})"
    if derivation.platform != platform:
        if platform is None:
            return f"it was post-processed for {derivation.platform}"
        return f"it was post-processed for {derivation.platform or 'nothing'}, not {platform}"
    if version is None:
        if derivation.source == name or derivation.source.startswith(FILES):
            return None
        return f"it was derived from {derivation.describe()}"
    if derivation.source != name or derivation.version != version:
        return f"it was derived from {derivation.describe()}, not {name} v{version}"
    return None


def find_rank_version(
    client: sdk.Client,
    rank_name: str,
    *,
    name: str,
    version: int | None,
    key: EngineKey | None,
    platform: str | None = None,
) -> tuple[int, int] | None:
    """(version, nbytes) of the newest version of `rank_name` (among the last `SCAN_VERSIONS`)
    that `fits`; None (and one log line saying why) when there is none."""
    try:
        info = client.info(rank_name)
    except NotFound:
        return None
    versions = sorted((int(v) for v in info.get("versions") or [info["version"]]), reverse=True)
    why = ""
    for v in versions[:SCAN_VERSIONS]:
        one = info if v == int(info["version"]) else _info_or_none(client, rank_name, v)
        if one is None:
            continue
        derivation = Derivation.from_origin(one.get("origin"))
        reason = fits(derivation, name=name, version=version, key=key, platform=platform)
        if reason is None:
            return v, int(one.get("nbytes") or 0)
        why = why or f"{rank_name} v{v}: {reason}"
    log.info("tensord: not using the rank set %s: %s", rank_name, why or "no version fits")
    return None


def _info_or_none(client: sdk.Client, name: str, version: int) -> dict[str, Any] | None:
    try:
        return client.info(name, version)
    except NotFound:
        return None


def put_derived(
    client: sdk.Client, name: str, tensors: Mapping[str, torch.Tensor], derivation: Derivation, *, what: str
) -> int | None:
    """Put `tensors` as the next version of `name` with `derivation` as its origin; None (and a
    log line) on failure: publishing is a favour to the next engine, never fatal to this one."""
    if not tensors:
        return None
    start = time.perf_counter()
    sources = {k: v.detach() for k, v in tensors.items()}
    specs = {k: (str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in sources.items()}
    devices = {v.device for v in sources.values()}
    device = "cpu" if len(devices) != 1 or next(iter(devices)).type == "cpu" else str(next(iter(devices)))
    try:
        with client.reserve(name, specs, device=device, origin=derivation.to_origin()) as reservation:
            reservation.write_all(sources)
            version = reservation.commit()
    except sdk.TensordError as exc:
        log.warning("tensord: could not publish %s as %s: %s", what, name, exc)
        return None
    nbytes = sum(t.numel() * t.element_size() for t in sources.values())
    log.info(
        "tensord: published the %s as %s v%d (%.3f GB, %d tensors, derived from %s) in %.2f s",
        what,
        name,
        version,
        nbytes / 1e9,
        len(sources),
        derivation.describe(),
        time.perf_counter() - start,
    )
    return version
