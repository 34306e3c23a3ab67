"""Plain-JSON views of the routing table for the live UI: each slot, and the snapshot a page
gets on connecting (the events that follow are the live feed's: ``dispatch.web.live``).

Pure: the same table always gives the same payloads, so the WebSocket snapshot, the deltas
and the tests agree by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dispatch.lib import redact
from dispatch.routing import eviction, slot_fields, speaks, states
from dispatch.routing.table import ModelEntry, RoutingTable, SlotEntry

# What dispatch.upstream.outliers lays over the table: the ejections this process decided
# that its table does not carry yet, slot name -> (state, reason).
Overlay = Mapping[str, tuple[str, str]]


def shown(slot: SlotEntry, overlay: tuple[str, str] | None = None) -> tuple[str, str]:
    """The state the UI shows and why: an ejected slot's ``degraded`` and its reason (the
    table's ejection, or this process's ``overlay``) over a ``ready`` the probes still
    report, never over a state they found worse."""
    if not slot.enabled:
        return states.DISABLED, slot.last_error
    if slot.state == states.READY:
        if overlay is not None:
            return overlay
        if slot.ejection is not None and slot.ejection.out:
            return states.DEGRADED, slot.ejection.reason
    return slot.state, slot.last_error


def slot_payload(
    slot: SlotEntry, inflight: int = 0, overlay: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The slot as the UI shows it (its state as ``shown`` says)."""
    models = sorted(
        slot.models.values(), key=lambda m: (not m.is_default, m.source == "alias", m.model_id)
    )
    state, last_error = shown(slot, overlay)
    # Every field the page shows (dispatch.routing.slot_fields), then those it shows in
    # another shape or derived from the table.
    return {
        **{f.name: getattr(slot, f.name) for f in slot_fields.PAYLOAD},
        "url": redact.masked(slot.url),
        "state": state,
        "last_error": redact.masked(last_error),
        "default_model": slot.default_model,
        "models": [_model_payload(slot, m) for m in models],
        # The operator's draining: the page counts what is still in flight (`drained` at 0).
        "drain": slot.enabled and slot.state == states.DRAINING,
        "drift": list(slot.drift),
        "endpoints": sorted(slot.endpoints),
        "endpoints_listed": slot.endpoints_listed,
        # Where those come from (its manifest, asking its server, its kind), and every
        # endpoint it serves: natively, or translated to one it speaks ("messages":
        # "translated").
        "endpoints_from": speaks.source(slot.endpoints_listed, slot.spoken),
        "serves": speaks.serving(slot.endpoints),
        "inflight": inflight,
    }


def _model_payload(slot: SlotEntry, m: ModelEntry) -> dict[str, Any]:
    """A model as the picker and the slot's card show it: where it is (load state, progress,
    why its last load failed), whether it is pinned, and which model (its server's id)
    choosing it would unload first."""
    return {
        "id": m.model_id,
        "upstream": m.upstream_model,
        "source": m.source,
        # An alias pattern (claude-haiku-*): shown on the slot's card, never a picker choice,
        # for it is no model id to send as it is.
        "pattern": m.pattern,
        "default": m.is_default,
        "load": m.load,
        # Only where they mean something: a progress left from a finished load, or the
        # reason of a failure a later load made good, would mislead.
        "progress": m.progress if m.load == states.LOAD_LOADING else None,
        "load_error": redact.masked(m.load_error) if m.load == states.FAILED else "",
        "pinned": m.pinned,
        "would_unload": eviction.would_unload(slot, m.model_id),
    }


def snapshot(
    table: RoutingTable,
    inflight: Mapping[str, int],
    watcher: Mapping[str, object],
    overlay: Overlay | None = None,
    queues: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    over = overlay or {}
    return {
        "type": "snapshot",
        "version": table.version,
        "slots": [
            slot_payload(s, inflight.get(s.name, 0), over.get(s.name)) for s in table.slots.values()
        ],
        "watcher": dict(watcher),
        # The page names, groups and explains states as the server does (it has no copy).
        "states": states.page_states(),
        "loads": states.page_loads(),
        # The loader's latest word per slot (a load, an eviction, the requests waiting), as
        # the live feed's `queue` events carry it (dispatch.web.live).
        "queues": list(queues or ()),
    }
