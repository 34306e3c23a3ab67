"""Which loaded model makes room for another: decided once, here, for the loader that acts
and for every place that says beforehand what a choice would unload. Pure.

A slot whose server keeps at most ``model_limit`` models (llama.cpp's ``--models-max``,
Lemonade's ``max_models``) and has that many in memory must unload one before it loads
another. hal0web unloads it itself, before asking for the load, so the server's own eviction
never picks a busy model: the least recently used model that is idle and not pinned.
"""

from __future__ import annotations

from collections.abc import Mapping

from dispatch.routing import states
from dispatch.routing.table import ModelEntry, SlotEntry


def served(slot: SlotEntry) -> dict[str, ModelEntry]:
    """The slot's models by the id its server knows them by (aliases are the same model)."""
    by_upstream: dict[str, ModelEntry] = {}
    for m in slot.models.values():
        if m.source != "alias" or m.upstream_model not in by_upstream:
            by_upstream[m.upstream_model] = m
    return by_upstream


def resident(slot: SlotEntry) -> list[ModelEntry]:
    """Its models in memory (or on their way in or out), least recently used first."""
    models = [m for m in served(slot).values() if m.load in states.RESIDENT]
    return sorted(models, key=lambda m: (m.last_used, m.upstream_model))


def needs_room(slot: SlotEntry, upstream_model: str) -> bool:
    """Whether loading ``upstream_model`` first needs another model unloaded."""
    if not slot.model_limit:
        return False
    others = [m for m in resident(slot) if m.upstream_model != upstream_model]
    return len(others) >= slot.model_limit


def victim(
    slot: SlotEntry, upstream_model: str, busy: Mapping[str, int] | None = None
) -> str | None:
    """The model (its upstream id) to unload before loading ``upstream_model``: the least
    recently used unpinned one, idle ones before busy ones (``busy``: requests in flight per
    upstream id). None when no room is needed, or when every candidate is pinned."""
    if not needs_room(slot, upstream_model):
        return None
    busy = busy or {}
    candidates = [
        m
        for m in resident(slot)
        if m.upstream_model != upstream_model and not m.pinned and m.load != states.UNLOADING
    ]
    if not candidates:
        return None
    idle = [m for m in candidates if not busy.get(m.upstream_model)]
    return (idle or candidates)[0].upstream_model


def would_unload(slot: SlotEntry, model_id: str) -> str | None:
    """What choosing ``model_id`` now would unload (its upstream id), as the page and
    ``/v1/models`` say beforehand; None when it is loaded already or there is room."""
    entry = slot.models.get(model_id)
    if entry is None or entry.load in states.SERVABLE or not slot.loads_models:
        return None
    return victim(slot, entry.upstream_model)
