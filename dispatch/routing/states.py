"""Slot states and the one place that says which changes are legal. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# From → the states a slot may move to. `draining` is the operator's: probes never enter or
# leave it; the operator ends it by setting the slot back to `unknown` (probed afresh).
TRANSITIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "unknown": frozenset({"offline", "loading", "ready", "error", "draining"}),
        "offline": frozenset({"loading", "ready", "error", "draining", "unknown"}),
        "loading": frozenset({"ready", "offline", "error", "draining", "unknown"}),
        "ready": frozenset({"loading", "offline", "error", "draining", "unknown"}),
        "error": frozenset({"offline", "loading", "ready", "draining", "unknown"}),
        "draining": frozenset({"unknown"}),
    }
)


class IllegalTransition(ValueError):
    pass


def check(current: str, new: str) -> None:
    if new not in TRANSITIONS:
        raise IllegalTransition(f"unknown state {new!r}")
    if new != current and new not in TRANSITIONS[current]:
        raise IllegalTransition(f"a slot cannot go from {current} to {new}")


def after_probe(current: str, observed: str) -> str:
    """The state a probe's observation leads to. A draining slot stays draining."""
    if current == "draining":
        return current
    check(current, observed)
    return observed
