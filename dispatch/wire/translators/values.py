"""Values read from JSON a translator did not write (a client's body, an upstream's answer),
each checked for the type it must have: JSON's ``true`` is no number, a negative count none.

Pure: no Django, no I/O.
"""

from __future__ import annotations

from typing import TypeGuard


def is_number(value: object) -> TypeGuard[int | float]:
    """A JSON number (``bool`` is an ``int`` to Python, never to JSON)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: object) -> TypeGuard[int]:
    """A JSON integer."""
    return isinstance(value, int) and not isinstance(value, bool)


def count(value: object) -> int:
    """A token count an upstream reported: 0 when it sent none (or no count)."""
    return value if is_integer(value) and value > 0 else 0


def text(value: object) -> str:
    """A string, or "" when it is none."""
    return value if isinstance(value, str) else ""
