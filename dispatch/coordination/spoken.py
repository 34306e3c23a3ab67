"""A request found a slot's server without a route it was taken to speak: written down.

The watcher asks each ready server what it speaks (``dispatch.lifecycle.discovery``), but
a server can change under the same URL, and an endpoint nobody asked about may be missing.
When a request meets a missing route (``dispatch.upstream.forward``), the finding is written
to the slot's row like the watcher's (``Slot.spoken``, ``dispatch.routing.speaks``), so every
process's next table has the slot serve that endpoint by translation, or refuse it.
"""

from __future__ import annotations

import logging

from asgiref.sync import sync_to_async
from django.db import DatabaseError, close_old_connections, transaction

from dispatch.routing import speaks
from dispatch.routing.table import SlotEntry

log = logging.getLogger("hal0.health")


def write_not_spoken(slot: SlotEntry, endpoint: str) -> bool:
    """Note in the slot's row that its server does not speak ``endpoint`` (sync, one
    transaction). Only while the row is of the kind, type and URL the request was sent to;
    True when the row changed."""
    from dispatch.models import Slot, StateVersion

    close_old_connections()
    of = speaks.key(slot.kind, slot.type, slot.url)
    with transaction.atomic():
        # The version row first, as every writer of slots does: the trigger takes it after
        # the update, and two writers taking the two rows in another order would deadlock.
        StateVersion.lock()
        row = Slot.objects.select_for_update().filter(name=slot.name).first()
        if row is None or speaks.key(row.kind, row.type, row.url) != of:
            return False
        found = speaks.found_for(row.spoken, of)
        if found.get(endpoint) is False:
            return False  # another request (or the watcher) wrote it first
        row.spoken = speaks.stored(of, {**found, endpoint: False})
        row.save(update_fields=["spoken"])
    log.info("slot %s does not speak %s: a request met no such route", slot.name, endpoint)
    return True


async def not_spoken(slot: SlotEntry, endpoint: str) -> None:
    """``write_not_spoken`` from the event loop; a database that refuses is logged, not the
    request's failure (the next request meets the route again, and writes again)."""
    try:
        await sync_to_async(write_not_spoken, thread_sensitive=True)(slot, endpoint)
    except DatabaseError as exc:
        log.warning("could not note that slot %s does not speak %s: %s", slot.name, endpoint, exc)
