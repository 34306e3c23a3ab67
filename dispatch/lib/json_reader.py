"""The one reader of JSON that comes from outside: a client's body, a model server's answer.

It reads what the servers behind hal0web read, and no deeper than ``MAX_DEPTH`` levels:

- orjson reads it (fast);
- a lone UTF-16 surrogate escape (``"\\ud83d"``, what JavaScript's JSON.stringify writes for
  a string cut mid-emoji) is JSON, and model servers take it; only orjson refuses it, so such
  a text is read by the standard library instead, once orjson has found nothing else wrong
  with it (NaN and Infinity are Python's extensions, not JSON; neither is a number past a
  double's range);
- nesting is bounded, whichever parser reads the text: deeper than ``MAX_DEPTH`` raises
  ``TooDeep`` (a ``ValueError``). The standard library's parser recurses on Python's stack
  and raised ``RecursionError`` near 1,000 levels (a 500 on every JSON endpoint); orjson
  stops at 1,024 levels by itself, and its ``dumps`` at 254 (``wire.errors.dumps`` falls
  back to the standard library, which recurses too). 512 leaves Python's stack half its
  room under anything that walks or writes a value read here, and passes what clients send:
  model servers built on pydantic refuse past ~200 levels, the deepest JSON schema a tool
  declares is a few dozen.

Counting a text's depth in Python would cost more than parsing it, so orjson counts:
wrapped in ``1024 - MAX_DEPTH`` arrays, a text deeper than ``MAX_DEPTH`` passes orjson's own
limit. The wrapping costs ~40 µs (the arrays made and unwrapped), so a text with at most
``MAX_DEPTH`` opening brackets (it cannot nest deeper: most bodies) is read as it is, for
the cost of counting them (~0.6 µs more than orjson alone for a 0.5 KB chat request; a
20 KB one with 1,000 brackets, ~45 µs more).

Pure: bytes in, values out.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

MAX_DEPTH = 512
_ORJSON_DEPTH = 1024  # orjson refuses a text nested deeper (a fixed limit of its parser)
_ORJSON_TOO_DEEP = "depth limit exceeded"  # its message then (tests/test_json_reader.py)
_PAD = _ORJSON_DEPTH - MAX_DEPTH
_OPEN, _CLOSE = b"[" * _PAD, b"]" * _PAD
# Every byte but the opening brackets: what is left of a text without them is its count of
# them (one pass, ~0.35 ns a byte; two bytes.count() take twice that).
_NOT_OPENERS = bytes(sorted(set(range(256)) - set(b"[{")))
# Past this size the brackets cost more to count than the wrapping they might spare (~40 µs,
# whatever the size).
_COUNT_BELOW = 64 * 1024
# The hex digits of a surrogate escape (\uD800-\uDFFF), lone or paired.
_SURROGATE_HEX = re.compile(rb"(?<=\\u)[dD][89a-fA-F][0-9a-fA-F]{2}")


class TooDeep(ValueError):
    """A text nested deeper than ``MAX_DEPTH`` levels of arrays and objects."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_DEPTH} levels")
        self.limit = MAX_DEPTH


def loads(raw: bytes | str) -> Any:
    """The value of the JSON text ``raw``. ``TooDeep`` past ``MAX_DEPTH`` levels; any other
    text that is not JSON raises orjson's ``JSONDecodeError``, saying where (both are
    ``ValueError``)."""
    if isinstance(raw, str):
        # (A lone surrogate character cannot be UTF-8: passed through, to be refused below.)
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        return _bounded(raw)
    except orjson.JSONDecodeError as exc:
        if b"\\u" not in raw:
            raise
        error = exc
    # orjson refused it, perhaps for a lone surrogate escape alone. The same text with every
    # surrogate escape made a space has the same structure: orjson checks it (its errors, its
    # depth), and only a text that passes is the standard library's to read, never too deep.
    neutral = _SURROGATE_HEX.sub(b"0020", raw)
    if neutral == raw:
        raise error
    try:
        _bounded(neutral)
    except orjson.JSONDecodeError:
        raise error from None
    try:
        return json.loads(raw)
    except ValueError:  # (none known: orjson took the same text, surrogates aside)
        raise error from None


def _bounded(raw: bytes) -> Any:
    """orjson's reading of ``raw``, no deeper than ``MAX_DEPTH``."""
    if len(raw) < _COUNT_BELOW and len(raw.translate(None, _NOT_OPENERS)) <= MAX_DEPTH:
        return orjson.loads(raw)
    try:
        value = orjson.loads(_OPEN + raw + _CLOSE)
    except orjson.JSONDecodeError as exc:
        if exc.msg == _ORJSON_TOO_DEEP:
            raise TooDeep() from None
    else:
        # One JSON text inside the arrays is one element in each; anything else (``1],[2``)
        # is a text orjson refuses alone. (Each of them is a list: it opens with our "[".)
        for _ in range(_PAD):
            if len(value) != 1:
                break
            value = value[0]
        else:
            return value
    # Not one JSON text: orjson's own error, saying where in the text as it came. (A text
    # orjson reads alone reads wrapped too, unless too deep: this raises.)
    return orjson.loads(raw)
