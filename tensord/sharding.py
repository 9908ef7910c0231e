"""Tensor-parallel split on load: which dim of which tensor each rank gets, as byte ranges.

Rules are data, an ordered list of ``(regex, dim | "replicate")`` pairs searched against the
tensor name; the first match wins and unmatched names get the rules' default. They load from
TOML (format in ``configs/sharding-rules.example.toml``); Llama-style rules ship as
``tensord/rules/llama.toml``.

Splitting dim ``d`` of a row-major tensor into ``tp`` equal parts gives rank ``r`` the bytes of
``prod(shape[:d])`` rows, each one contiguous run of ``shape[d] // tp * prod(shape[d+1:])``
elements, a row's bytes apart; ``plan_shard`` gives those ``Runs`` in the shard's own order.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensord.checkpoint import FileTensor
from tensord.rule_patterns import first_matches
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.manifest import DTYPE_SIZES, MAX_DIMS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

REPLICATE = "replicate"
#: A rule's action: a dim to split (negative counts from the end) or ``None`` to replicate.
Split = int | None

RULES_DIR = Path(__file__).resolve().parent / "rules"


@dataclass(frozen=True)
class ShardRule:
    pattern: re.Pattern[str]
    dim: Split  # None: replicate

    def describe(self) -> str:
        return f"{self.pattern.pattern!r} -> {REPLICATE if self.dim is None else self.dim}"


@dataclass(frozen=True)
class ShardRules:
    """Ordered rules, first match wins; ``default`` for names no rule matches."""

    rules: tuple[ShardRule, ...] = ()
    default: Split = None

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, object]], *, default: object = REPLICATE) -> ShardRules:
        """Build from ``(regex, dim | "replicate")`` pairs, validating each."""
        rules = tuple(
            ShardRule(_compile(pattern, f"rule {i}"), _split(dim, f"rule {i}"))
            for i, (pattern, dim) in enumerate(pairs)
        )
        return cls(rules, _split(default, "default"))

    def match(self, name: str) -> Split:
        """The split for ``name``: a dim, or ``None`` to replicate."""
        return self.splits([name])[0]

    def splits(self, names: Sequence[str]) -> list[Split]:
        """`match` of every name at once: patterns that could backtrack for long are matched in
        a child process with a time limit (`tensord.rule_patterns`; rules may come from a client)."""
        found = first_matches([r.pattern for r in self.rules], names)
        return [self.rules[i].dim if i >= 0 else self.default for i in found]


def _compile(pattern: object, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise InvalidArgument(f"sharding {where}: pattern must be a non-empty string, not {pattern!r:.80}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidArgument(f"sharding {where}: bad regex {pattern!r:.80}: {exc}") from None


def _split(value: object, where: str) -> Split:
    if value == REPLICATE:
        return None
    if is_int(value, -MAX_DIMS, MAX_DIMS - 1):
        return value
    raise InvalidArgument(f"sharding {where}: split must be a dim (int) or {REPLICATE!r}, not {value!r:.40}")


def parse_rules(data: Mapping[str, Any], *, source: str = "rules") -> ShardRules:
    """Validate rules already parsed from TOML: ``default`` and a ``[[rule]]`` array."""
    unknown = set(data) - {"default", "rule"}
    if unknown:
        raise InvalidArgument(f"{source}: unknown keys {sorted(unknown)}; expected 'default' and [[rule]]")
    raw = data.get("rule", [])
    if not isinstance(raw, list):
        raise InvalidArgument(f"{source}: 'rule' must be an array of tables ([[rule]])")
    pairs = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or set(entry) != {"pattern", "split"}:
            raise InvalidArgument(f"{source}: rule {i} must have exactly the keys 'pattern' and 'split'")
        pairs.append((entry["pattern"], entry["split"]))
    try:
        return ShardRules.from_pairs(pairs, default=data.get("default", REPLICATE))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{source}: {exc.message}") from None


def load_rules(path: str | os.PathLike[str]) -> ShardRules:
    """Load and validate sharding rules from a TOML file."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise NotFound(f"{p}: no such sharding rules file", path=p) from None
    except OSError as exc:
        raise InvalidArgument(f"{p}: cannot read sharding rules: {exc.strerror or exc}", path=p) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{p}: bad TOML: {exc}", path=p) from None
    rules = parse_rules(data, source=p)
    log.debug("loaded %d sharding rules from %s", len(rules.rules), p)
    return rules


def builtin_rules(name: str) -> ShardRules:
    """Rules shipped with tensord, by name (``"llama"``)."""
    if not re.fullmatch(r"[a-z0-9_-]+", name) or not (RULES_DIR / f"{name}.toml").is_file():
        known = sorted(p.stem for p in RULES_DIR.glob("*.toml"))
        raise NotFound(f"no built-in sharding rules {name!r:.40}; known: {', '.join(known)}")
    return load_rules(RULES_DIR / f"{name}.toml")


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
