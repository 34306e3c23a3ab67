"""A slot taken out of rotation, written to its row so every process honours it.

One process's requests find a slot whose probes pass but whose requests fail
(``dispatch.upstream.outliers``); the ejection is written to the slot's row like any other
change (its triggers move ``StateVersion``, the commit wakes every process's check), so
every process's next table carries it (``SlotEntry.ejection``) within a second, and a
process that starts later reads it with the rest. The watcher's probe writes end it
(``dispatch.lifecycle.changes``): back in rotation after the back-off, forgotten when the
slot goes down or comes back up.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.db import close_old_connections, transaction

from dispatch.coordination.store import ejection_of
from dispatch.routing import states
from dispatch.routing.table import Ejection, next_ejection

log = logging.getLogger("hal0.health")

FIELDS = ["ejected_until", "ejected_reason", "ejections"]


def write_ejection(name: str, cause: str, backoff_s: float) -> Ejection | None:
    """Take ``name`` out of rotation (sync, one transaction): for ``backoff_s`` doubled per
    ejection in a row. The ejection in force, or None when the row is not a ready slot's
    (down, it is the watcher's; disabled or gone, nobody's). One already in force stands:
    requests let through before it began do not make it longer."""
    from dispatch.models import Slot, StateVersion

    close_old_connections()
    with transaction.atomic():
        # The version row first, as every writer of slots does (dispatch.coordination.spoken).
        StateVersion.lock()
        row = Slot.objects.select_for_update().filter(name=name).first()
        if row is None or not row.enabled or row.state != states.READY:
            return None
        now = datetime.now(UTC)
        if row.ejected_until is not None and row.ejected_until > now:
            return ejection_of(row)
        made = next_ejection(row.ejections, backoff_s, cause, now.timestamp())
        assert made.until is not None
        row.ejected_until = datetime.fromtimestamp(made.until, UTC)
        row.ejected_reason, row.ejections = made.reason, made.count
        row.save(update_fields=FIELDS)
    log.warning("slot %s is out of rotation: %s", name, made.reason)
    return made


def write_cleared(name: str) -> bool:
    """A request to ``name`` succeeded: no ejection, and none in a row (sync). True when the
    row changed."""
    from dispatch.models import Slot, StateVersion

    close_old_connections()
    with transaction.atomic():
        StateVersion.lock()
        row = Slot.objects.select_for_update().filter(name=name).first()
        if row is None or (row.ejected_until is None and not row.ejections):
            return False
        was_out = row.ejected_until is not None
        row.ejected_until, row.ejected_reason, row.ejections = None, "", 0
        row.save(update_fields=FIELDS)
    if was_out:
        log.info("slot %s is back in rotation: a request to it succeeded", name)
    return True


class Written:
    """Where ``dispatch.upstream.outliers`` writes what it decides: the database, from the
    event loop. A database that refuses raises (the caller keeps its judgement to itself)."""

    async def eject(self, name: str, cause: str, backoff_s: float) -> Ejection | None:
        return await sync_to_async(write_ejection, thread_sensitive=True)(name, cause, backoff_s)

    async def clear(self, name: str) -> None:
        await sync_to_async(write_cleared, thread_sensitive=True)(name)


written = Written()
