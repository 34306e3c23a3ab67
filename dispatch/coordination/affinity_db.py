"""Response affinity in the database: one row per response, pruned by the watcher's process.

The table is not one of the routing table's (``dispatch.coordination.triggers``): writing it never moves
``StateVersion``, so a thousand responses a minute reload nothing anywhere.
"""

from __future__ import annotations

import datetime as dt
import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from dispatch.coordination.outages import DATABASE
from dispatch.coordination.retention import prune_older

log = logging.getLogger("hal0.affinity")


def save(response_id: str, slot: str) -> None:
    save_many([(response_id, slot)])


def save_many(records: list[tuple[str, str]]) -> None:
    from dispatch.models import ResponseAffinity

    close_old_connections()  # asgiref's shared thread, outside any request (as persistence.apply)
    now = dt.datetime.now(dt.UTC)
    # One statement, insert or replace: the same id again (a retried write) is harmless.
    ResponseAffinity.objects.bulk_create(
        [ResponseAffinity(response_id=rid, slot=slot, created_at=now) for rid, slot in records],
        update_conflicts=True,
        unique_fields=["response_id"],
        update_fields=["slot", "created_at"],
    )


def find(response_id: str) -> str | None:
    from dispatch.models import ResponseAffinity

    close_old_connections()
    cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=settings.HAL0_RESPONSE_RETENTION_DAYS)
    return (
        ResponseAffinity.objects.filter(response_id=response_id, created_at__gte=cutoff)
        .values_list("slot", flat=True)
        .first()
    )


def prune(now: dt.datetime | None = None) -> int:
    """Delete records older than HAL0_RESPONSE_RETENTION_DAYS (sync; the watcher runs it)."""
    from dispatch.models import ResponseAffinity

    days = settings.HAL0_RESPONSE_RETENTION_DAYS
    return prune_older(ResponseAffinity, "created_at", days, "response records", log, now)


class DatabaseAffinity:
    """The default store: every worker on the same database finds every id."""

    service = DATABASE
    volatile = False

    async def remember(self, response_id: str, slot: str) -> None:
        await sync_to_async(save, thread_sensitive=True)(response_id, slot)

    async def remember_many(self, records: list[tuple[str, str]]) -> None:
        await sync_to_async(save_many, thread_sensitive=True)(records)

    async def lookup(self, response_id: str) -> str | None:
        found: str | None = await sync_to_async(find, thread_sensitive=True)(response_id)
        return found

    async def aclose(self) -> None:
        return None
