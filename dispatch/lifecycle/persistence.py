"""A probe result, written: the slot's row and its models, under the row lock.

The write goes through the model signals like any other change, so the routing table, the
waiting requests and the live UI all hear of it by one path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.db import OperationalError, close_old_connections, transaction
from django.utils import timezone

from dispatch.coordination import ejections
from dispatch.coordination.store import ejection_of
from dispatch.kinds import ModelLoad
from dispatch.lifecycle.changes import CLEARED, Changes, changes, reads_models
from dispatch.lifecycle.probe import Observation
from dispatch.routing import speaks, states
from dispatch.routing.table import ModelEntry, SlotEntry

if TYPE_CHECKING:
    from dispatch.models import Slot, SlotModel

log = logging.getLogger("hal0.health")

# Models the loader (dispatch.lifecycle.loader) is loading or evicting, by slot: a probe
# leaves their load state alone until the loader is done with them. The loader runs in the
# process that runs the watcher, so both read this one dict.
held: dict[str, frozenset[str]] = {}

# Pauses between tries of a probe result's write (SQLite busy past its timeout, PostgreSQL
# briefly away). Short: a probe result is worth most while it is fresh.
SAVE_RETRY_PAUSES_S = (0.05, 0.2, 0.5)


def apply(slot_name: str, obs: Observation) -> bool:
    """Persist what a probe saw (sync, one transaction). True when the slot's row changed
    (its state, last error or drift; its models may change without it).

    The state is read and written under a row lock in one transaction, so an operator's
    change (draining, disabling) cannot be overwritten by a probe that looked earlier.
    """
    from dispatch.models import Slot, StateVersion

    # This runs in asgiref's long-lived shared thread, outside any request, so Django's
    # per-request connection housekeeping never reaches it: do it here.
    close_old_connections()
    with transaction.atomic():
        StateVersion.lock()
        slot = Slot.objects.select_for_update().filter(name=slot_name).first()
        if slot is None or not slot.enabled:
            return False
        rows = list(slot.models.all()) if reads_models(obs) else []
        change = changes(_as_entry(slot, rows), obs, held.get(slot_name, frozenset()), time.time())
        _write_models(slot, rows, change, obs)
        return _write_slot(slot, change, obs)


def _as_entry(slot: Slot, rows: Iterable[SlotModel]) -> SlotEntry:
    """The locked row as ``changes`` reads a table entry (only what it reads)."""
    models = {
        m.model_id: ModelEntry(
            m.model_id,
            m.upstream_model,
            m.source,
            m.is_default,
            m.upstream_fields or {},
            load=m.load_state,
            progress=m.load_progress,
            load_error=m.load_error,
        )
        for m in rows
    }
    return SlotEntry(
        name=slot.name,
        url=slot.url,
        kind=slot.kind,
        type=slot.type,
        spoken=speaks.found_for(slot.spoken, _key(slot)),
        state=slot.state,
        last_error=slot.last_error,
        models=MappingProxyType(models),
        drift=tuple(slot.drift or ()),
        loads_models=slot.loads_models,
        model_limit=slot.model_limit,
        ejection=ejection_of(slot),
    )


def _write_models(slot: Slot, rows: list[SlotModel], change: Changes, obs: Observation) -> None:
    from dispatch.models import ModelSource, SlotModel

    for m in rows:
        if m.model_id in change.dropped:
            m.delete()
    for m in rows:
        fields = change.fields.get(m.model_id)
        if fields is not None:
            m.upstream_fields = dict(fields)
            m.save(update_fields=["upstream_fields"])
        load = change.loads.get(m.upstream_model)
        if load is not None and m.model_id not in change.dropped:
            set_load(m, load)
            m.save(update_fields=LOAD_FIELDS)
    details = obs.details or {}
    said = obs.loads.models if obs.loads is not None else {}
    for i, model_id in enumerate(change.added):
        row = SlotModel(
            slot=slot,
            model_id=model_id,
            upstream_model=model_id,
            source=ModelSource.DISCOVERED,
            is_default=change.first_is_default and i == 0,
            upstream_fields=dict(details.get(model_id) or {}),
        )
        if obs.loads is not None:
            set_load(row, said.get(model_id) or ModelLoad(states.UNLOADED))
        row.save()


LOAD_FIELDS = ["load_state", "load_progress", "load_error"]


def _key(slot: Slot) -> str:
    """What a finding of what the slot speaks is of (``dispatch.routing.speaks.key``)."""
    return speaks.key(slot.kind, slot.type, slot.url)


def set_load(row: SlotModel, load: ModelLoad) -> None:
    row.load_state, row.load_progress, row.load_error = load.state, load.progress, load.error


def _write_slot(slot: Slot, change: Changes, obs: Observation) -> bool:
    updated: list[str] = []
    if change.state is not None:
        slot.state = change.state
        slot.state_changed_at = timezone.now()
        updated += ["state", "state_changed_at"]
    if change.last_error is not None:
        slot.last_error = change.last_error
        updated.append("last_error")
    if change.drift is not None:
        slot.drift = list(change.drift)
        updated.append("drift")
    if change.loads_models is not None:
        slot.loads_models = change.loads_models
        updated.append("loads_models")
    if change.model_limit is not None:
        slot.model_limit = change.model_limit
        updated.append("model_limit")
    if change.spoken is not None:
        slot.spoken = speaks.stored(_key(slot), change.spoken)
        updated.append("spoken")
    if change.ejection is not None:
        # Ended: back in rotation, the count kept (the next ejection lasts longer until a
        # request succeeds); cleared: forgotten, the slot went down or came back up.
        was_out = slot.ejected_until is not None
        slot.ejected_until, slot.ejected_reason = None, ""
        if change.ejection == CLEARED:
            slot.ejections = 0
        updated += ejections.FIELDS
    else:
        was_out = False
    if updated:
        slot.save(update_fields=updated)
        if change.state is not None:
            log.info(
                "slot %s is %s%s", slot.name, slot.state, f" ({obs.error})" if obs.error else ""
            )
        if was_out:
            log.info("slot %s: %s", slot.name, _ejection_ends(change))
    return bool(updated)


def _ejection_ends(change: Changes) -> str:
    if change.ejection != CLEARED:
        return "back in rotation, a probe passed after its back-off"
    if change.state is not None:
        return f"its ejection forgotten, the watcher found it {change.state}"
    return "its ejection forgotten, it is not ready"


async def save(name: str, obs: Observation) -> bool | None:
    """Write a probe result, trying again while the database is briefly unavailable.

    If every try fails the result is dropped with a warning (None), not lost: the table
    still holds the old state, so the next probe differs from it and writes again.
    """
    pauses = iter(SAVE_RETRY_PAUSES_S)
    while True:
        try:
            return await sync_to_async(apply, thread_sensitive=True)(name, obs)
        except OperationalError as exc:
            pause = next(pauses, None)
            if pause is None:
                log.warning(
                    "could not save the probe of slot %s (%s); the next probe saves it",
                    name,
                    exc,
                )
                return None
        await asyncio.sleep(pause)


def write_loads(
    slot_name: str,
    loads: Mapping[str, ModelLoad],
    used: Mapping[str, float] | None = None,
    done: Iterable[str] = (),
) -> None:
    """The loader's writes (sync, one transaction): new load states by upstream model id
    (every row naming it, aliases too), when models were last used, and the operator's
    wishes it has acted on (``done``: upstream ids whose ``wanted`` is cleared)."""
    from dispatch.models import Slot, StateVersion

    close_old_connections()
    finished = set(done)
    with transaction.atomic():
        StateVersion.lock()
        slot = Slot.objects.select_for_update().filter(name=slot_name).first()
        if slot is None:
            return
        for row in slot.models.all():
            fields: list[str] = []
            load = loads.get(row.upstream_model)
            if load is not None and (row.load_state, row.load_progress, row.load_error) != (
                load.state,
                load.progress,
                load.error,
            ):
                set_load(row, load)
                fields += LOAD_FIELDS
            at = (used or {}).get(row.upstream_model)
            if at is not None and at > row.last_used_at:
                row.last_used_at = at
                fields.append("last_used_at")
            if row.wanted and row.upstream_model in finished:
                row.wanted = ""
                fields.append("wanted")
            if fields:
                row.save(update_fields=fields)


async def save_loads(
    slot_name: str,
    loads: Mapping[str, ModelLoad],
    used: Mapping[str, float] | None = None,
    done: Iterable[str] = (),
) -> bool:
    """:func:`write_loads`, tried again while the database is briefly away. False when
    every try failed (the loader's next step writes again)."""
    for pause in (*SAVE_RETRY_PAUSES_S, None):
        try:
            await sync_to_async(write_loads, thread_sensitive=True)(slot_name, loads, used, done)
            return True
        except OperationalError as exc:
            if pause is None:
                log.warning("could not save the model loads of slot %s (%s)", slot_name, exc)
                return False
            await asyncio.sleep(pause)
    return False
