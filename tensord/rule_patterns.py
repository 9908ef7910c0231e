"""Sharding rules' regexes from a client, matched without letting one stall the daemon.

Python's `re` backtracks and holds the interpreter lock while it does: a pattern like `(a+)+$`
against a 30-character tensor name runs for minutes, and every client of the daemon waits.
A pattern is matched in the daemon's process only when it cannot backtrack badly: at most one
place where a match may go more than one way (a repeat of varying count, `?` included, or an
alternation), none under a repeat, and no back reference; a search over a name of L characters
then takes ~L**2 steps at most (times the alternatives). Rules with any other pattern are
matched in a child process (`python -I`, no imports beyond `re` and `json`) that is killed
after `timeout` seconds: the load then fails with InvalidArgument saying so, and nothing is
reserved.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tensord_contract.errors import InvalidArgument

TIMEOUT = 10.0  # seconds the child may take to match every name

_CHILD = """
import json, re, sys
job = json.load(sys.stdin)
rules = [re.compile(p) for p in job["patterns"]]
json.dump([next((i for i, r in enumerate(rules) if r.search(n)), -1) for n in job["names"]], sys.stdout)
"""


@functools.lru_cache(maxsize=1024)
def bounded(pattern: re.Pattern[str]) -> bool:
    """Whether `pattern` cannot backtrack badly (see the module doc); False where unsure."""
    try:
        try:
            from re import _constants, _parser  # type: ignore[attr-defined]
        except ImportError:  # Python 3.10
            import sre_constants as _constants
            import sre_parse as _parser

        return _choices(_parser.parse(pattern.pattern, pattern.flags), _constants) <= 1
    except _Unbounded:
        return False
    except Exception:  # another Python's parser: not sure, so not in the daemon's process
        return False


class _Unbounded(Exception):
    pass


def _choices(items: Any, c: Any) -> int:
    """The places in `items` where a match may go more than one way (a repeat of varying count,
    `?` included, and an alternation); _Unbounded where one lies under a repeat (its count
    multiplies them) or for a back reference."""
    found = 0
    for op, av in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT) or op is getattr(c, "POSSESSIVE_REPEAT", None):
            low, high, body = av
            inner = _choices(body, c)
            if inner and high > 1:
                raise _Unbounded
            found += inner + (low != high)
        elif op is c.BRANCH:
            found += 1 + sum(_choices(branch, c) for branch in av[1])
        elif op is c.SUBPATTERN:
            found += _choices(av[-1], c)
        elif op in (c.ASSERT, c.ASSERT_NOT):
            found += _choices(av[1], c)
        elif op is getattr(c, "ATOMIC_GROUP", None):
            found += _choices(av, c)
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            raise _Unbounded
    return found


def first_matches(patterns: Sequence[re.Pattern[str]], names: Sequence[str], timeout: float = TIMEOUT) -> list[int]:
    """For each name, the index of the first pattern that `search`es it, or -1: in this process
    where every pattern is `bounded`, else in a child process killed after `timeout` seconds."""
    if all(map(bounded, patterns)):
        return [next((i for i, p in enumerate(patterns) if p.search(n)), -1) for n in names]
    job = json.dumps({"patterns": [p.pattern for p in patterns], "names": list(names)})  # inline flags travel
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD],
            input=job,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InvalidArgument(
            f"sharding rules took over {timeout:.0f} s to match {len(names)} tensor names: "
            "simplify the patterns (no nested or repeated repeats)"
        ) from None
    if out.returncode != 0:
        raise InvalidArgument(f"sharding rules could not be matched: {out.stderr.strip()[-200:]}")
    found = json.loads(out.stdout)
    if not (isinstance(found, list) and len(found) == len(names)):
        raise InvalidArgument("sharding rules could not be matched: the matcher answered something else")
    return [int(i) for i in found]
