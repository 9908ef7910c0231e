"""Tensor-parallel split on load: which dim of which tensor each rank gets, as byte ranges.

Which dim is the rules' to say (`tensord.sharding_rules`, re-exported here). Splitting dim
``d`` of a row-major tensor into ``tp`` equal parts gives rank ``r`` the bytes of
``prod(shape[:d])`` rows, each one contiguous run of ``shape[d] // tp * prod(shape[d+1:])``
elements, a row's bytes apart; ``plan_shard`` gives those ``Runs`` in the shard's own order.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from tensord.checkpoint import FileTensor
from tensord.sharding_rules import (
    REPLICATE,
    RULES_DIR,
    ShardRule,
    ShardRules,
    Split,
    builtin_rules,
    load_rules,
    parse_rules,
)
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.manifest import DTYPE_SIZES

__all__ = [
    "REPLICATE",
    "RULES_DIR",
    "Runs",
    "ShardPlan",
    "ShardRule",
    "ShardRules",
    "Split",
    "builtin_rules",
    "load_rules",
    "parse_rules",
    "plan_ranks",
    "plan_shard",
    "plan_shards",
    "plan_split",
    "recorded_shards",
    "whole",
]


@dataclass(frozen=True)
class Runs:
    """``count`` runs of ``length`` bytes of a file, ``stride`` bytes apart from ``first``: a
    shard's bytes in order (a whole tensor is one run). Kept as four numbers, not a list: a
    column split of a large matrix is thousands of runs."""

    first: int
    count: int
    stride: int
    length: int

    @property
    def end(self) -> int:
        """The file offset after the last run (``first`` when there is none)."""
        return self.first + (self.count - 1) * self.stride + self.length if self.count else self.first

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Every run as (file offset, length)."""
        starts = (self.first + i * self.stride for i in range(self.count))
        return tuple(zip(starts, itertools.repeat(self.length, self.count), strict=True))


@dataclass(frozen=True)
class ShardPlan:
    """How to read one rank's shard of a tensor: concatenate ``runs`` of ``tensor.path``."""

    tensor: FileTensor
    rank: int
    tp: int
    dim: Split  # normalised (non-negative) dim, or None when replicated
    shape: tuple[int, ...]  # the shard's shape
    runs: Runs

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The runs as (absolute file offset, length), in order."""
        return self.runs.ranges()

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def dtype(self) -> str:
        return self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.tensor.dtype]


def plan_shard(tensor: FileTensor, rank: int, tp: int, rules: ShardRules) -> ShardPlan:
    """Plan rank ``rank`` of ``tp``'s part of ``tensor`` under ``rules``."""
    return plan_split(tensor, rank, tp, rules.match(tensor.name))


def plan_split(tensor: FileTensor, rank: int, tp: int, split: Split) -> ShardPlan:
    """Plan rank ``rank`` of ``tp``'s part of ``tensor`` split at dim ``split`` (None: whole)."""
    if not is_int(tp, 1):
        raise InvalidArgument(f"tp must be a positive int, not {tp!r:.40}")
    if not is_int(rank, 0, tp - 1):
        raise InvalidArgument(f"rank must be an int in [0, {tp}), not {rank!r:.40}")
    shape = tensor.shape
    if split is None or tp == 1:
        return ShardPlan(tensor, rank, tp, None, shape, whole(tensor))
    if not shape:
        raise InvalidArgument(
            f"tensor {tensor.name!r}: a 0-d tensor can only be replicated, the rule splits dim {split}",
            tensor=tensor.name,
        )
    d = split + len(shape) if split < 0 else split
    if not 0 <= d < len(shape):
        raise InvalidArgument(
            f"tensor {tensor.name!r}: split dim {split} is out of range for shape {list(shape)}",
            tensor=tensor.name,
        )
    if shape[d] % tp:
        raise InvalidArgument(
            f"tensor {tensor.name!r}: dim {d} of size {shape[d]} is not divisible by tp={tp}",
            tensor=tensor.name,
        )
    part = shape[d] // tp
    inner = math.prod(shape[d + 1 :]) * DTYPE_SIZES[tensor.dtype]
    rows, row_bytes, chunk = math.prod(shape[:d]), shape[d] * inner, part * inner
    runs = Runs(tensor.offset + rank * chunk, rows if chunk else 0, row_bytes, chunk)
    return ShardPlan(tensor, rank, tp, d, (*shape[:d], part, *shape[d + 1 :]), runs)


def whole(tensor: FileTensor) -> Runs:
    """A whole tensor's bytes: one run (none when it is empty)."""
    return Runs(tensor.offset, 1 if tensor.nbytes else 0, tensor.nbytes, tensor.nbytes)


def plan_shards(tensors: Iterable[FileTensor], rank: int, tp: int, rules: ShardRules) -> list[ShardPlan]:
    """``plan_shard`` for every tensor; the first bad one raises."""
    return plan_ranks(tensors, tp, rules, [rank])[0]


def plan_ranks(
    tensors: Iterable[FileTensor], tp: int, rules: ShardRules, ranks: Iterable[int] | None = None
) -> list[list[ShardPlan]]:
    """``plan_shards`` of each of `ranks` (default: every rank), the rules matched once."""
    listed = list(tensors)
    splits = rules.splits([t.name for t in listed])
    return [[plan_split(t, r, tp, s) for t, s in zip(listed, splits, strict=True)] for r in (ranks or range(tp))]


def recorded_shards(
    tensors: Iterable[FileTensor], layout: Iterable[tuple[str, tuple[int, ...]]], rank: int, tp: int
) -> list[ShardPlan]:
    """Rank ``rank`` of ``tp``'s shards of a file's `tensors` as a rank set records them
    (`layout`: the set's dtype and shape of each, in the same order): each split is read back
    from the shapes, where only an equal split of one dim (or none: replicated) gives the
    recorded shape, so the rules the load ran under need not be recorded. NotFound where a
    tensor's dtype or shape is no such shard of the file's any more."""
    plans = []
    for t, (dtype, shape) in zip(tensors, layout, strict=True):
        full, shape = tuple(t.shape), tuple(shape)
        split = [d for d, (a, b) in enumerate(zip(full, shape, strict=False)) if a != b]
        fits = len(split) == 0 or (len(split) == 1 and full[split[0]] == shape[split[0]] * tp)
        if t.dtype != dtype or len(full) != len(shape) or not fits:
            raise NotFound(
                f"tensor {t.name!r}: the file holds {t.dtype} {list(full)}, no tp={tp} shard of which is "
                f"the recorded {dtype} {list(shape)}",
                tensor=t.name,
            )
        plans.append(plan_split(t, rank, tp, split[0] if split else None))
    return plans
