"""RL updates of a running engine from tensord, verified: `WeightUpdater`, engine-agnostic."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

import sdk
from sdk.engines.common import LoadWeights, _load_weights_of, read_set, unpublish_params
from sdk.engines.verify import check_parameters, tie_groups
from tensord_contract.errors import IntegrityError, InvalidArgument, TensordError

log = logging.getLogger("sdk.engines")

#: An engine's own check of what its kernels compute with, given the version's tensors and the
#: tied parameters; returns problems (empty: fine).
EngineCheck = Callable[[Mapping[str, torch.Tensor], Mapping[str, list[str]]], list[str]]


@dataclass
class Serving:
    """What an engine serves, kept on its model: the set and version, and the parameters the
    last check verified (a later version must cover them)."""

    name: str
    version: int
    covered: set[str] = field(default_factory=set)


_SERVING = "_tensord_serving"


def serving(model: torch.nn.Module) -> Serving | None:
    """What `model` serves from tensord (None: unknown, e.g. loaded from files)."""
    return model.__dict__.get(_SERVING)


def mark_serving(model: torch.nn.Module, name: str, version: int, covered: set[str] | None = None) -> None:
    model.__dict__[_SERVING] = Serving(name, version, set(covered or ()))  # kept out of state_dict


def before_of(s: Serving) -> tuple[str, int]:
    return s.name, s.version


class WeightUpdater:
    """Receives RL weight updates from tensord into a running engine's model.

    `start()` → `update(name, version)` (one or more) → `finish()`. An update reads the version
    (zero-copy when it lies on this node) and hands it to `load_weights` (the engine's own
    converter, as at startup). The read views stay open until `finish()`: engines that buffer
    tensors until a layer is complete (vLLM's layer-wise reload) still hold references to them.
    `on_start`/`on_finish` wrap the engine's own preparation and post-processing.

    `finish()` then checks the parameters against the version (`sdk.engines.verify`, with
    `packed`, `tp_size` and the engine's `check`). On a mismatch it loads the version served
    before again (checked the same way) and raises `sdk.IntegrityError` saying why: the engine
    never serves a mix. With ``verify=False`` nothing is checked.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        client: sdk.Client,
        *,
        device: torch.device | str,
        name: str | None = None,
        load_weights: LoadWeights | None = None,
        on_start: Callable[[], None] | None = None,
        on_finish: Callable[[], None] | None = None,
        verify: bool = True,
        packed: Mapping[str, list[str]] | None = None,
        tp_size: int = 1,
        check: EngineCheck | None = None,
    ) -> None:
        self.model, self.client, self.device, self.name = model, client, device, name
        self._load_weights = load_weights
        self._on_start, self._on_finish = on_start, on_finish
        self._verify, self._packed, self._tp_size, self._check = verify, dict(packed or {}), tp_size, check
        self._open: contextlib.ExitStack | None = None
        #: (name, version) of the last update finished, None before the first.
        self.loaded: tuple[str, int] | None = None
        self._pending: tuple[str, int] | None = None
        self._read: Mapping[str, torch.Tensor] | None = None
        self._ties: dict[str, list[str]] = {}
        self._restoring = False

    def start(self) -> None:
        if self._open is not None:
            raise InvalidArgument("tensord: a weight update is already in progress; finish it first")
        unpublish_params(self.model)  # an update writes the parameters: nobody may read them now
        self._ties = tie_groups(self.model)  # before the engine swaps parameters out
        self._open = contextlib.ExitStack()
        if self._on_start is not None:
            self._on_start()

    def update(self, name: str | None = None, version: int | str | None = None) -> int:
        """Load one version (default: the latest) of `name` (default: the name given at init)."""
        if self._open is None:
            raise InvalidArgument("tensord: start() the weight update before update()")
        name = name if name is not None else self.name
        if name is None:
            raise InvalidArgument('tensord: no set named: give "name" in the update or at init')
        start = time.perf_counter()
        loaded, tensors = self._open.enter_context(read_set(self.client, name, version, device=self.device))
        loader = self._load_weights if self._load_weights is not None else _load_weights_of(self.model)
        loader(tensors.items())
        log.info("tensord: update from %s v%d read in %.3f s", name, loaded, time.perf_counter() - start)
        self._pending, self._read = (name, loaded), tensors
        return loaded

    def finish(self) -> tuple[str, int] | None:
        """Run the engine's post-processing, check the parameters, then let go of the views."""
        if self._open is None:
            raise InvalidArgument("tensord: finish() without start()")
        pending, read = self._pending, self._read
        self._pending = self._read = None
        try:
            if self._on_finish is not None:
                self._on_finish()
            problems = self._problems(pending, read)
        finally:
            held, self._open = self._open, None
            held.close()
        if problems:
            assert pending is not None
            self._fail(pending, problems)
        if pending is not None:
            self.loaded = pending
        return self.loaded

    def _problems(self, pending: tuple[str, int] | None, read: Mapping[str, torch.Tensor] | None) -> list[str]:
        if pending is None or read is None or not self._verify:
            return []
        start = time.perf_counter()
        before = serving(self.model)
        covered = before.covered if before is not None else None
        checked = check_parameters(
            self.model, read, ties=self._ties, packed=self._packed, tp_size=self._tp_size, covered=covered
        )
        problems = checked.problems + (self._check(read, self._ties) if self._check is not None else [])
        if not problems:
            mark_serving(self.model, *pending, checked.verified)
            log.info(
                "tensord: %s v%d verified: %d parameters match the version (%.3f s)",
                *pending,
                len(checked.verified),
                time.perf_counter() - start,
            )
        return problems

    def _fail(self, pending: tuple[str, int], problems: list[str]) -> None:
        name, version = pending
        why = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        before = serving(self.model)
        if before is None or self._restoring:
            raise IntegrityError(
                f"tensord: the engine's parameters do not match {name} v{version} ({why}); "
                "no earlier version could be restored: the parameters are undefined, update again"
            )
        log.error("tensord: %s v%d failed verification (%s); restoring %s v%d", name, version, why, *before_of(before))
        self._restoring = True
        try:
            self.start()
            self.update(before.name, before.version)
            self.finish()  # checked too: raises if even the restore does not match
        except TensordError as exc:
            if isinstance(exc, IntegrityError):
                raise
            self.abort()
            raise IntegrityError(
                f"tensord: the engine's parameters do not match {name} v{version} ({why}), and "
                f"{before.name} v{before.version} could not be read again ({exc}): the parameters are undefined"
            ) from exc
        finally:
            self._restoring = False
        raise IntegrityError(
            f"tensord: the engine's parameters did not match {name} v{version} after the update ({why}); "
            f"the engine serves {before.name} v{before.version} again"
        )

    def abort(self) -> None:
        """Drop an update in progress without post-processing (the model is then undefined)."""
        if self._open is not None:
            held, self._open = self._open, None
            held.close()
        self._pending = self._read = None
