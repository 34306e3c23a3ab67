"""A probe result, written: the slot's row and its models, under the row lock.

The write goes through the model signals like any other change, so the routing table, the
waiting requests and the live UI all hear of it by one path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from types import MappingProxyType
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.db import OperationalError, close_old_connections, transaction
from django.utils import timezone

from dispatch.lifecycle.changes import Changes, changes, reads_models
from dispatch.lifecycle.probe import Observation
from dispatch.routing.table import ModelEntry, SlotEntry

if TYPE_CHECKING:
    from dispatch.models import Slot, SlotModel

log = logging.getLogger("hal0.health")

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
        change = changes(_as_entry(slot, rows), obs)
        _write_models(slot, rows, change, obs)
        return _write_slot(slot, change, obs)


def _as_entry(slot: Slot, rows: Iterable[SlotModel]) -> SlotEntry:
    """The locked row as ``changes`` reads a table entry (only what it reads)."""
    models = {
        m.model_id: ModelEntry(
            m.model_id, m.upstream_model, m.source, m.is_default, m.upstream_fields or {}
        )
        for m in rows
    }
    return SlotEntry(
        name=slot.name,
        url=slot.url,
        state=slot.state,
        last_error=slot.last_error,
        models=MappingProxyType(models),
        drift=tuple(slot.drift or ()),
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
    details = obs.details or {}
    for i, model_id in enumerate(change.added):
        SlotModel.objects.create(
            slot=slot,
            model_id=model_id,
            upstream_model=model_id,
            source=ModelSource.DISCOVERED,
            is_default=change.first_is_default and i == 0,
            upstream_fields=dict(details.get(model_id) or {}),
        )


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
    if updated:
        slot.save(update_fields=updated)
        if change.state is not None:
            log.info(
                "slot %s is %s%s", slot.name, slot.state, f" ({obs.error})" if obs.error else ""
            )
    return bool(updated)


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
