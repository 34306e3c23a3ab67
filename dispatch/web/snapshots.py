"""Plain-JSON views of the routing table for the live UI, and the events between two tables.

Pure: the same table always gives the same payloads, so the WebSocket snapshot, the deltas
and the tests agree by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dispatch.lib import redact
from dispatch.routing import slot_fields, states
from dispatch.routing.table import RoutingTable, SlotEntry

# What dispatch.upstream.outliers lays over the table: slot name -> (state, reason).
Overlay = Mapping[str, tuple[str, str]]


def slot_payload(
    slot: SlotEntry, inflight: int = 0, overlay: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The slot as the UI shows it; ``overlay`` (an ejected slot's ``degraded`` and why)
    shows over a ``ready`` the probes still report, never over a state they found worse."""
    models = sorted(
        slot.models.values(), key=lambda m: (not m.is_default, m.source == "alias", m.model_id)
    )
    state, last_error = (slot.state if slot.enabled else states.DISABLED), slot.last_error
    if overlay is not None and state == states.READY:
        state, last_error = overlay
    # Every field the page shows (dispatch.routing.slot_fields), then those it shows in
    # another shape or derived from the table.
    return {
        **{f.name: getattr(slot, f.name) for f in slot_fields.PAYLOAD},
        "url": redact.masked(slot.url),
        "state": state,
        "last_error": redact.masked(last_error),
        "default_model": slot.default_model,
        "models": [
            {
                "id": m.model_id,
                "upstream": m.upstream_model,
                "source": m.source,
                "default": m.is_default,
            }
            for m in models
        ],
        "drift": list(slot.drift),
        "endpoints": sorted(slot.endpoints),
        "endpoints_listed": slot.endpoints_listed,
        "inflight": inflight,
    }


def snapshot(
    table: RoutingTable,
    inflight: Mapping[str, int],
    watcher: Mapping[str, object],
    overlay: Overlay | None = None,
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
    }


def _models_key(slot: SlotEntry) -> tuple[Any, ...]:
    return (slot.default_model, tuple(sorted(slot.models.items())), slot.drift)


def table_events(
    old: RoutingTable,
    new: RoutingTable,
    inflight: Mapping[str, int],
    overlay: Overlay | None = None,
) -> list[dict[str, Any]]:
    """What a UI that showed ``old`` needs to hear to show ``new``, most specific first."""
    over = overlay or {}
    events: list[dict[str, Any]] = []
    # Both ends, so a page can tell a stale event (to an older version) from a gap (from a
    # version after the one it holds).
    versions = {"from_version": old.version, "version": new.version}
    for name in old.slots.keys() - new.slots.keys():
        events.append({"type": "slot.deleted", **versions, "slot": name})
    for name, slot in new.slots.items():
        before = old.slots.get(name)
        if before == slot:
            continue
        payload = slot_payload(slot, inflight.get(name, 0), over.get(name))
        if before is None:
            kind = "slot.updated"
        else:
            changed_state = (before.state, before.enabled, before.last_error) != (
                slot.state,
                slot.enabled,
                slot.last_error,
            )
            changed_models = _models_key(before) != _models_key(slot)
            rest_before = _without(before)
            rest_now = _without(slot)
            if rest_before != rest_now or (changed_state and changed_models):
                kind = "slot.updated"
            elif changed_models:
                kind = "slot.models"
            else:
                kind = "slot.state"
            if kind == "slot.state":
                payload["previous_state"] = before.state if before.enabled else states.DISABLED
        events.append({"type": kind, **versions, "slot": payload})
    return events


def _without(slot: SlotEntry) -> tuple[Any, ...]:
    return (
        slot.url,
        slot.kind,
        slot.type,
        slot.device,
        slot.is_default,
        slot.priority,
        slot.api_key_env,
        slot.max_concurrency,
        slot.connect_timeout_s,
        slot.first_byte_timeout_s,
        slot.idle_timeout_s,
        slot.max_duration_s,
        slot.endpoints,
    )
