"""Sharding rules, as data: an ordered list of ``(regex, dim | "replicate")`` pairs searched
against the tensor name; the first match wins and unmatched names get the rules' default. They
load from TOML (format in ``configs/sharding-rules.example.toml``); Llama-style rules ship as
``tensord/rules/llama.toml``. No numpy here: `tensord load --tp` checks rules before it sends
them, and the command starts fast (`tensord.sharding` plans the shards).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensord.rule_patterns import first_matches
from tensord_contract.checks import is_int
from tensord_contract.errors import InvalidArgument, NotFound
from tensord_contract.limits import MAX_DIMS

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
