"""A small, deterministic TOML writer: the same document always gives the same bytes.

Python reads TOML (tomllib) but does not write it. Manifests need exactly one spelling of
each document so that export -> import -> export is byte-identical, so the writer is ours:
scalars and inline tables first, then sub-tables, then arrays of tables, in insertion order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any


class Inline(dict[str, Any]):
    """A table written on one line (``aliases = { hermes = "…" }``)."""


def dumps_table(doc: Mapping[str, Any]) -> str:
    lines: list[str] = []
    _emit_table(lines, [], doc)
    return "\n".join(lines) + "\n"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _key(k: str) -> str:
    # fullmatch: with match() and "$", a key ending in a newline passed for bare.
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-tripping form; always has "." or "e"
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _emit_table(lines: list[str], path: list[str], tbl: Mapping[str, Any]) -> None:
    """Scalars (and inline tables) first, then sub-tables, then arrays of tables."""
    scalars = [
        (k, v)
        for k, v in tbl.items()
        if isinstance(v, Inline) or not (isinstance(v, dict) or _is_table_array(v))
    ]
    tables = [(k, v) for k, v in tbl.items() if isinstance(v, dict) and not isinstance(v, Inline)]
    arrays = [(k, v) for k, v in tbl.items() if _is_table_array(v)]
    dotted = ".".join(_key(p) for p in path)
    # A table holding only sub-tables needs no header of its own (TOML defines it implicitly).
    if path and (scalars or not (tables or arrays)):
        if lines:
            lines.append("")
        lines.append(f"[{dotted}]")
    for k, v in scalars:
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in tables:
        _emit_table(lines, [*path, k], v)
    for k, items in arrays:
        for item in items:
            if lines:
                lines.append("")
            lines.append(f"[[{'.'.join(_key(p) for p in [*path, k])}]]")
            sub = _sub_entries(item)
            for sk, sv in sub[0]:
                lines.append(f"{_key(sk)} = {_value(sv)}")
            for sk, sv in sub[1]:
                _emit_table(lines, [*path, k, sk], sv)
            for sk, sv in sub[2]:
                _emit_table(lines, [*path, k], {sk: sv})


def _sub_entries(
    tbl: Mapping[str, Any],
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], list[tuple[str, Any]]]:
    scalars = [(k, v) for k, v in tbl.items() if not (isinstance(v, dict) or _is_table_array(v))]
    tables = [(k, v) for k, v in tbl.items() if isinstance(v, dict)]
    arrays = [(k, v) for k, v in tbl.items() if _is_table_array(v)]
    return scalars, tables, arrays
