"""hal0web's own store of the Responses API responses it translated (the slot, speaking only
chat, keeps nothing): one database row per response, read by every worker, pruned by the
watcher's process after HAL0_RESPONSE_RETENTION_DAYS like the response affinity records.

A response is kept when its answer (or its stream's ``response.completed``) passes, before
the client has those bytes, so a follow-up on any worker finds it. Its row holds the Response
as answered, the input items it answered and the conversation before them; a later request
naming it in ``previous_response_id`` is answered after that whole conversation. Like
``ResponseAffinity`` the table has no trigger: writing it reloads no routing table.

The database away (``dispatch.coordination.outages``): a response to keep waits in this
process's memory (answered from there meanwhile) and is written once the database is back;
a request about a response the memory does not hold is ``Unavailable``
(503 ``store_unavailable``), not a 404.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections

from dispatch.coordination.outages import DATABASE, Unavailable
from dispatch.coordination.retention import prune_older
from dispatch.wire.translators.responses_back import Made

log = logging.getLogger("hal0.responses")

P = ParamSpec("P")
R = TypeVar("R")
PENDING = 1_000  # responses waiting for the database to come back, at most


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


class _Pending:
    """Responses kept while the database was away, oldest first, until it is back."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.made: OrderedDict[str, tuple[Made, str, str | None]] = OrderedDict()
        self.lost = 0
        self._flusher: asyncio.Task[None] | None = None

    def add(self, made: Made, slot: str, upstream_model: str | None) -> None:
        self.made[made.response_id] = (made, slot, upstream_model)
        if len(self.made) > PENDING:
            self.made.popitem(last=False)
            self.lost += 1
        loop = asyncio.get_running_loop()
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush(), name="hal0-responses-flush")

    def close(self) -> None:
        """The process ends: what could not be written is lost, and said so."""
        if self.made:
            log.warning(
                "%d kept responses made while the database was away go unwritten with this process",
                len(self.made),
            )
        if self._flusher is not None:
            self._flusher.cancel()
        self.reset()

    def find(self, response_id: str) -> Stored | None:
        found = self.made.get(response_id)
        if found is None:
            return None
        made, slot, upstream_model = found
        model = made.response.get("model")
        return Stored(
            made.response,
            made.items,
            made.history,
            slot,
            model if isinstance(model, str) else "",
            upstream_model or "",
        )

    async def _flush(self) -> None:
        while self.made:
            await DATABASE.back()
            while self.made:
                response_id, (made, slot, upstream_model) = next(iter(self.made.items()))
                try:
                    await _database(_save, f"could not keep response {response_id}")(
                        made, slot, upstream_model
                    )
                except Unavailable:
                    break  # away again: wait for it again
                except Exception:
                    log.warning("could not keep response %s", response_id, exc_info=True)
                self.made.pop(response_id, None)
        if self.lost:
            log.warning(
                "%d responses made while the database was away were dropped (more than %d waited)",
                self.lost,
                PENDING,
            )
            self.lost = 0


pending = _Pending()


def _database(call: Callable[P, R], what: str) -> Callable[P, Awaitable[R]]:
    """``call`` in the shared thread; Unavailable when the database cannot be reached (at
    once while it is known to be away)."""

    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if not DATABASE.available():
            DATABASE.missed()
            raise _unavailable()
        try:
            result: R = await sync_to_async(call, thread_sensitive=True)(*args, **kwargs)
        except DATABASE.errors as exc:
            DATABASE.failed(what, exc)
            raise _unavailable() from exc
        DATABASE.ok()
        return result

    return run


def _unavailable() -> Unavailable:
    return Unavailable(
        "store_unavailable",
        "The responses hal0web keeps cannot be read now: the database is away. "
        "Try again in a few seconds.",
    )


async def keep(kept: object, slot: str, upstream_model: str | None) -> None:
    """Keep what a translation made (a ``Made`` response; anything else is not ours). Never
    raises: the answer is the client's either way. The database away, it waits in memory."""
    if not isinstance(kept, Made):
        return
    try:
        await _database(_save, f"could not keep response {kept.response_id}")(
            kept, slot, upstream_model
        )
    except Unavailable:
        pending.add(kept, slot, upstream_model)
    except Exception:
        log.warning("could not keep response %s of slot %s", kept.response_id, slot, exc_info=True)


async def find(response_id: str) -> Stored | None:
    waiting = pending.find(response_id)
    if waiting is not None:
        return waiting
    return await _database(_find, f"could not read response {response_id}")(response_id)


async def delete(response_id: str) -> bool:
    if pending.made.pop(response_id, None) is not None:
        return True  # never written: nothing to delete there
    return await _database(_delete, f"could not delete response {response_id}")(response_id)
