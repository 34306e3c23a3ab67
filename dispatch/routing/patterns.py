"""Model-name patterns: an alias may be a glob (``claude-haiku-*``) that names every model
id it matches. Pure: what a pattern is, whether it is usable, how specific it is, and the
table's matcher (compiled once per table, memoized per table).

Globs are ``fnmatch``'s (``*``, ``?``, ``[...]``, ``[!...]``) and **case sensitive**, as
everything else that names a model is: exact ids and aliases are dictionary keys, a key's
model allowlist is matched with ``fnmatchcase``, and model servers treat ids as written. A
pattern that ignored case would route ``Claude-X`` where the exact id ``Gemma`` never
reaches ``gemma``.

Order, when several patterns match a name: the one with the most literal characters (those
not ``*``, ``?`` or inside ``[...]``) wins, so ``claude-haiku-*`` beats ``claude-*``; a tie
goes to the pattern that sorts first by code point. Not declaration order: a manifest's
aliases table is written back sorted, and rows of different slots have no order between
them, so a declaration order would not survive an export or a second slot. Slots that
declare the same pattern all serve the name, ranked as slots serving one model are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase, translate

# A name with one of these is a pattern (only an alias may be one).
GLOB_CHARS = frozenset("*?[")
# Names a table remembers matching (a pattern, or None for no match): a burst of the same
# name pays one scan; random names must not grow it forever.
MEMO_LIMIT = 1024


def is_pattern(name: str) -> bool:
    return not GLOB_CHARS.isdisjoint(name)


def _bracket_end(pattern: str, i: int) -> int:
    """Where the ``[...]`` opened at ``i`` closes (the index of its ``]``), or -1 when it
    does not: ``fnmatch``'s own reading (a ``]`` right after ``[`` or ``[!`` is a member)."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    return pattern.find("]", j)


def literal_length(pattern: str) -> int:
    """How many of the pattern's characters stand for themselves: its specificity."""
    count, i = 0, 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "[":
            end = _bracket_end(pattern, i)
            if end >= 0:
                i = end + 1
                continue
        if ch not in "*?":
            count += 1
        i += 1
    return count


def problem(pattern: str) -> str | None:
    """Why ``pattern`` is no usable pattern (None: it is one). ``fnmatch`` itself accepts
    anything (an unclosed ``[`` is a literal), so the mistakes are caught here."""
    i = 0
    while i < len(pattern):
        if pattern[i] == "[":
            end = _bracket_end(pattern, i)
            if end < 0:
                return (
                    f"the pattern {pattern!r} opens a '[' it never closes "
                    "(write '[[]' for a literal '[')"
                )
            i = end
        i += 1
    if literal_length(pattern) == 0:
        return (
            f"the pattern {pattern!r} has no literal character, so it would match nearly any "
            "model name: a catch-all is the opt-in HAL0_FALLBACK_SLOT, never an alias"
        )
    return None


def order_key(pattern: str) -> tuple[int, str]:
    """Most specific first, then by code point (see the module's docstring)."""
    return (-literal_length(pattern), pattern)


class Matcher:
    """A table's patterns, compiled once, most specific first; ``match`` gives the pattern
    that wins for a name (or None), remembering its answers in a bounded memo."""

    __slots__ = ("_compiled", "_memo")

    def __init__(self, patterns: Iterable[str]) -> None:
        ordered = sorted(set(patterns), key=order_key)
        self._compiled: tuple[tuple[str, Callable[[str], object]], ...] = tuple(
            (p, re.compile(translate(p)).match) for p in ordered
        )
        self._memo: dict[str, str | None] = {}

    def __bool__(self) -> bool:
        return bool(self._compiled)

    @property
    def patterns(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self._compiled)

    @property
    def memo(self) -> Mapping[str, str | None]:
        return self._memo

    def match(self, name: str) -> str | None:
        memo = self._memo
        try:
            return memo[name]
        except KeyError:
            pass
        found = next((p for p, match in self._compiled if match(name)), None)
        if len(memo) >= MEMO_LIMIT:  # bounded, as the table's suggestions memo is
            memo.clear()
        memo[name] = found
        return found


NO_PATTERNS = Matcher(())


def best_match(name: str, candidates: Iterable[str]) -> str | None:
    """The most specific of ``candidates`` (one slot's alias patterns) that matches
    ``name``. Not compiled ahead: only a ``slot/name`` naming none of the slot's own models
    comes here (``fnmatch`` keeps its compiled patterns in a cache of its own)."""
    return next((p for p in sorted(candidates, key=order_key) if fnmatchcase(name, p)), None)
