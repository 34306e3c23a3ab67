"""Slot states: their names, the sets the router and the page sort them into, and the one
place that says which changes are legal. Pure.

Every other module (and, through the WebSocket snapshot, the page) takes the names and sets
from here, so a state is added or regrouped in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class State(StrEnum):
    """What the watcher's probes (or the operator, for ``draining``) say a slot is."""

    UNKNOWN = "unknown"  # never probed, or the operator ended draining: probed afresh
    OFFLINE = "offline"
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    DRAINING = "draining"  # the operator's: finishes what it has, takes nothing new


# The names as plain strings: what the database, the table and JSON hold (orjson takes no
# enum for a dict key).
UNKNOWN: str = State.UNKNOWN.value
OFFLINE: str = State.OFFLINE.value
LOADING: str = State.LOADING.value
READY: str = State.READY.value
ERROR: str = State.ERROR.value
DRAINING: str = State.DRAINING.value

# Shown over a state, never stored as one: a ready slot dispatch.upstream.outliers ejected
# (the ejection is kept beside the state: SlotEntry.ejection), and a slot an operator disabled.
DEGRADED = "degraded"
DISABLED = "disabled"

# A probe found it down: its last error is kept, and the probe counts as failed.
PROBED_DOWN: frozenset[str] = frozenset({OFFLINE, ERROR})
# Takes no request: the resolver skips it, a forward does not wait on it.
DOWN: frozenset[str] = PROBED_DOWN | {DRAINING}
# Not up yet, and may come up soon: the watcher probes it more often (backing off).
NOT_UP_YET: frozenset[str] = frozenset({LOADING, OFFLINE, UNKNOWN})

# Preference among candidate slots: ready first, then loading, then never probed, then the
# rest; a state not listed ranks after them all (RANK_LAST).
RANK: Mapping[str, int] = MappingProxyType(
    {READY: 0, LOADING: 1, UNKNOWN: 2, ERROR: 3, OFFLINE: 3, DRAINING: 4}
)
RANK_LAST = 5

# Why a slot shown in this state cannot take a request, in the page's words ("<slot> is ...").
# The page reads them from the snapshot: a state is unusable there iff it is listed here.
UNUSABLE_WHY: Mapping[str, str] = MappingProxyType(
    {
        OFFLINE: "is offline (the server does not answer)",
        ERROR: "reports an error",
        DRAINING: "is draining (finishing its requests, taking no new ones)",
        DEGRADED: "is out of rotation (its requests failed while its probes pass)",
        DISABLED: "is disabled by an operator",
    }
)

# How the page colours a slot in each state (its card's `tone-*` class); unlisted: neutral.
TONES: Mapping[str, str] = MappingProxyType(
    {
        READY: "ok",
        LOADING: "warn",
        DRAINING: "warn",
        DEGRADED: "warn",
        OFFLINE: "bad",
        ERROR: "bad",
    }
)

# From → the states a slot may move to. `draining` is the operator's: probes never enter or
# leave it; the operator ends it by setting the slot back to `unknown` (probed afresh).
TRANSITIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        UNKNOWN: frozenset({OFFLINE, LOADING, READY, ERROR, DRAINING}),
        OFFLINE: frozenset({LOADING, READY, ERROR, DRAINING, UNKNOWN}),
        LOADING: frozenset({READY, OFFLINE, ERROR, DRAINING, UNKNOWN}),
        READY: frozenset({LOADING, OFFLINE, ERROR, DRAINING, UNKNOWN}),
        ERROR: frozenset({OFFLINE, LOADING, READY, DRAINING, UNKNOWN}),
        DRAINING: frozenset({UNKNOWN}),
    }
)


def page_states() -> dict[str, object]:
    """What the page needs to know of states, sent in the WebSocket snapshot: every name it
    may show, the one a badge shows when the watcher is stale, why each unusable one is, and
    the tone each is shown in."""
    return {
        "names": [*(s.value for s in State), DEGRADED, DISABLED],
        "unknown": UNKNOWN,
        "unusable": dict(UNUSABLE_WHY),
        "tones": dict(TONES),
    }


# --- Model load states: beside the slot's, one per model the slot lists -------------------------


class Load(StrEnum):
    """Where a model is, as its server says (``dispatch.kinds``: each kind reads its own
    server's words into these), or as hal0web's own loader has it between two readings."""

    LOADED = "loaded"
    LOADING = "loading"  # asked to load (by hal0web or the server itself); progress if known
    UNLOADED = "unloaded"  # on the server's disk, not in memory: a request waits for a load
    UNLOADING = "unloading"  # hal0web is evicting it: its requests in flight finish first
    FAILED = "failed"  # the last load failed; the reason is kept
    SLEEPING = "sleeping"  # in the server, paged out: it wakes on the next request by itself


LOADED: str = Load.LOADED.value
LOAD_LOADING: str = Load.LOADING.value
UNLOADED: str = Load.UNLOADED.value
UNLOADING: str = Load.UNLOADING.value
FAILED: str = Load.FAILED.value
SLEEPING: str = Load.SLEEPING.value

# A request for a model in one of these goes to the server as it is: no load asked first.
SERVABLE: frozenset[str] = frozenset({LOADED, SLEEPING})
# In memory (counts toward the server's limit of loaded models).
RESIDENT: frozenset[str] = frozenset({LOADED, LOAD_LOADING, UNLOADING, SLEEPING})
# How the page colours a model in each load state; unlisted: neutral.
LOAD_TONES: Mapping[str, str] = MappingProxyType(
    {LOADED: "ok", LOAD_LOADING: "warn", UNLOADING: "warn", FAILED: "bad"}
)

# The page sees a slot that is draining with nothing left in flight as this (never stored).
DRAINED = "drained"


def load_words(load: str, progress: float | None = None, error: str = "") -> str:
    """A model's load state in the operator's words: ``loading 40 %``, ``failed: <why>``
    (the admin, ``manage.py slots list``; the page builds the same from its payload)."""
    if load == LOAD_LOADING and progress is not None:
        return f"{load} {round(progress * 100)} %"
    if load == FAILED and error:
        return f"{load}: {error}"
    return load


def page_loads() -> dict[str, object]:
    """What the page needs to know of model load states (in the WebSocket snapshot)."""
    return {
        "names": [s.value for s in Load],
        "servable": sorted(SERVABLE),
        "tones": dict(LOAD_TONES),
        "drained": DRAINED,
    }


class IllegalTransition(ValueError):
    pass


def check(current: str, new: str) -> None:
    if new not in TRANSITIONS:
        raise IllegalTransition(f"unknown state {new!r}")
    if new != current and new not in TRANSITIONS[current]:
        raise IllegalTransition(f"a slot cannot go from {current} to {new}")


def after_probe(current: str, observed: str) -> str:
    """The state a probe's observation leads to. A draining slot stays draining."""
    if current == DRAINING:
        return current
    check(current, observed)
    return observed
