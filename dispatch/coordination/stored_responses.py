"""hal0web's own store of the Responses API responses it translated (the slot, speaking only
chat, keeps nothing): one database row per response, read by every worker, pruned by the
watcher's process after HAL0_RESPONSE_RETENTION_DAYS like the response affinity records.

A response is kept when its answer (or its stream's ``response.completed``) passes, before
the client has those bytes, so a follow-up on any worker finds it. Its row holds the Response
as answered, the input items it answered and the conversation before them; a later request
naming it in ``previous_response_id`` is answered after that whole conversation. Like
``ResponseAffinity`` the table has no trigger: writing it reloads no routing table.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from dispatch.coordination.retention import prune_older
from dispatch.wire.translators.responses_back import Made

log = logging.getLogger("hal0.responses")


@dataclass(frozen=True, slots=True)
class Stored:
    """One kept response, as the API layer answers from it."""

    response: dict[str, Any]
    items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    slot: str
    model: str
    upstream_model: str

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """Every item a follow-up continues: the conversation before, this input, its output."""
        output = self.response.get("output")
        return [*self.history, *self.items, *(output if isinstance(output, list) else [])]

    @property
    def names(self) -> set[str]:
        """The names its model went by (for a key's model allowlist)."""
        return {n for n in (self.model, f"{self.slot}/{self.model}", self.upstream_model) if n}


def _save(made: Made, slot: str, upstream_model: str | None) -> None:
    from dispatch.models import StoredResponse

    close_old_connections()  # asgiref's shared thread, outside any request
    model = made.response.get("model")
    StoredResponse.objects.update_or_create(
        response_id=made.response_id,
        defaults={
            "created_at": dt.datetime.now(dt.UTC),
            "slot": slot,
            "model": model if isinstance(model, str) else "",
            "upstream_model": upstream_model or "",
            "response": made.response,
            "input_items": made.items,
            "history": made.history,
        },
    )


def _cutoff() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=settings.HAL0_RESPONSE_RETENTION_DAYS)


def _find(response_id: str) -> Stored | None:
    from dispatch.models import StoredResponse

    close_old_connections()
    row = StoredResponse.objects.filter(response_id=response_id, created_at__gte=_cutoff()).first()
    if row is None:
        return None
    return Stored(
        row.response, row.input_items, row.history, row.slot, row.model, row.upstream_model
    )


def _delete(response_id: str) -> bool:
    from dispatch.models import StoredResponse

    close_old_connections()
    deleted, _ = StoredResponse.objects.filter(response_id=response_id).delete()
    return deleted > 0


def prune(now: dt.datetime | None = None) -> int:
    """Delete responses older than HAL0_RESPONSE_RETENTION_DAYS (sync; the watcher runs it)."""
    from dispatch.models import StoredResponse

    days = settings.HAL0_RESPONSE_RETENTION_DAYS
    return prune_older(StoredResponse, "created_at", days, "stored responses", log, now)


async def keep(kept: object, slot: str, upstream_model: str | None) -> None:
    """Keep what a translation made (a ``Made`` response; anything else is not ours). A
    failed write costs only the follow-ups: the answer is still the client's."""
    if not isinstance(kept, Made):
        return
    try:
        await sync_to_async(_save, thread_sensitive=True)(kept, slot, upstream_model)
    except Exception:
        log.warning("could not keep response %s of slot %s", kept.response_id, slot, exc_info=True)


async def find(response_id: str) -> Stored | None:
    found: Stored | None = await sync_to_async(_find, thread_sensitive=True)(response_id)
    return found


async def delete(response_id: str) -> bool:
    gone: bool = await sync_to_async(_delete, thread_sensitive=True)(response_id)
    return gone
