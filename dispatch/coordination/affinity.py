"""Response affinity: which slot made each Responses API response.

A response lives on the server that made it: ``previous_response_id``,
``GET``/``DELETE /v1/responses/{id}``, ``.../input_items`` and ``.../cancel`` only make
sense there. hal0web records ``id -> slot`` when a response passes (its JSON answer, or its
stream's ``response.created`` event) and looks it up for those requests, in a store every
worker shares: the database (``dispatch.coordination.affinity_db``), or Redis when ``REDIS_URL`` is set
(``dispatch.coordination.affinity_redis``), each with HAL0_RESPONSE_RETENTION_DAYS as its bound.

The write is awaited before the id reaches the client, so once a client has the id every
worker can find it. A small in-process memory of recent ids saves the common follow-up (the
same worker) its round trip; a miss there always asks the shared store.

The store away (``dispatch.coordination.outages``): an id is written to the other store when
there is one (Redis away: the database) and kept in memory, and written to its own store
once that is back, so no id is ever disowned. A Redis that comes back may have restarted
without what it held: every id this process remembers (its last RECENT) is written to it
again. A lookup the store cannot answer asks the other store; an id neither can vouch for is
``Unavailable`` (503 ``affinity_unavailable``), never a 404: hal0web cannot say it did not
make it. With Redis up, a miss there asks the database too (the ids written there while
Redis was away, by a worker that may not have lived to write them to Redis).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Protocol, TypeVar

import orjson
from django.conf import settings

from dispatch.coordination.affinity_db import DatabaseAffinity
from dispatch.coordination.outages import DATABASE, REDIS, Service, Unavailable

log = logging.getLogger("hal0.affinity")

T = TypeVar("T")

RECENT = 10_000  # ids this process remembers without asking the store
PENDING = 10_000  # ids waiting for their store to come back, at most
FLUSH_BATCH = 500  # ids written in one go when a store is back
# How much of a stream is searched for its response.created event (it is the first event).
SNIFF_LIMIT = 64 * 1024


class Store(Protocol):
    # The service it lives on (its outages are that service's).
    service: Service
    # Whether it may come back from an outage without what it held (a Redis that restarted
    # without persistence): this process's memory is written to it again.
    volatile: bool

    async def remember(self, response_id: str, slot: str) -> None: ...

    async def remember_many(self, records: list[tuple[str, str]]) -> None: ...

    async def lookup(self, response_id: str) -> str | None: ...

    async def aclose(self) -> None: ...


class _Away(Exception):
    """A store could not be asked (its service is away)."""


class Affinity:
    def __init__(self) -> None:
        self.reset()
        for service in (REDIS, DATABASE):
            service.returned.add(self._returned)

    def reset(self) -> None:
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._store: Store | None = None
        self._other: Store | None = None
        # Ids not yet in their store (it was away), oldest first: written once it is back.
        self._pending: OrderedDict[str, str] = OrderedDict()
        self._lost = 0  # pending ids dropped past PENDING (told when the store is back)
        self._flusher: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            if settings.REDIS_URL:
                from dispatch.coordination.affinity_redis import RedisAffinity

                self._store = RedisAffinity(settings.REDIS_URL)
            else:
                self._store = DatabaseAffinity()
        return self._store

    @property
    def other(self) -> Store | None:
        """The store asked when the first is away: the database beside Redis; none beside
        the database."""
        if self._other is None and settings.REDIS_URL:
            self._other = DatabaseAffinity()
        return self._other

    def _keep(self, response_id: str, slot: str) -> None:
        self._recent[response_id] = slot
        self._recent.move_to_end(response_id)
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    @staticmethod
    async def _call(store: Store, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` on ``store``; _Away (at once while its service is known to be away)."""
        if not store.service.available():
            store.service.missed()
            raise _Away
        try:
            result = await call()
        except store.service.errors as exc:
            store.service.failed(what, exc)
            raise _Away from exc
        store.service.ok()
        return result

    async def remember(self, response_id: str, slot: str) -> None:
        """Record ``response_id``; never raises: the answer is the client's either way."""
        self._keep(response_id, slot)
        store, what = self.store, f"could not record response {response_id}"
        try:
            await self._call(store, what, lambda: store.remember(response_id, slot))
            return
        except _Away:
            pass
        except Exception:
            # Not an outage (a bug): the answer is still the client's; say it in full.
            log.warning("could not record response %s of slot %s", response_id, slot, exc_info=True)
            return
        self._pending[response_id] = slot
        if len(self._pending) > PENDING:
            self._pending.popitem(last=False)
            self._lost += 1
        other = self.other
        if other is not None:  # other workers look there while the store is away
            try:
                await self._call(other, what, lambda: other.remember(response_id, slot))
            except _Away:
                pass

    async def lookup(self, response_id: str) -> str | None:
        """The slot that made ``response_id``; None when hal0web did not make it (as far as
        its stores tell); Unavailable when no store that may hold it can be asked."""
        slot = self._recent.get(response_id)
        if slot is not None:
            return slot
        store, other = self.store, self.other
        what = f"could not look up response {response_id}"
        away: Service | None = None
        try:
            slot = await self._call(store, what, lambda: store.lookup(response_id))
        except _Away:
            away = store.service
        if slot is None and other is not None:
            # The store away, or an id written to the database while it was.
            try:
                slot = await self._call(other, what, lambda: other.lookup(response_id))
            except _Away:
                away = away or other.service
        if slot is not None:
            self._keep(response_id, slot)
            return slot
        if away is not None:
            raise Unavailable(
                "affinity_unavailable",
                f"Cannot tell which slot made response '{response_id}': {away.name} is "
                f"away. Try again in a few seconds.",
            )
        return None

    def _returned(self, service: Service) -> None:
        """``service`` is back: write what waited for the store on it (and, to a store that
        may have come back empty, every id this process remembers)."""
        store = self._store
        if store is None or store.service is not service:
            return
        if not (self._pending or store.volatile):
            return
        loop = asyncio.get_running_loop()
        flusher = self._flusher
        if flusher is None or flusher.done() or flusher.get_loop() is not loop:
            self._flusher = loop.create_task(self._flush(), name="hal0-affinity-flush")

    async def _flush(self) -> None:
        store = self.store
        records = dict(self._recent) if store.volatile else {}
        records.update(self._pending)
        items = list(records.items())
        what = "could not record the responses made while it was away"
        for start in range(0, len(items), FLUSH_BATCH):
            batch = items[start : start + FLUSH_BATCH]
            try:
                await self._call(store, what, partial(store.remember_many, batch))
            except _Away:
                return  # away again: its next return writes them
            except Exception:
                log.warning("could not record %d responses", len(batch), exc_info=True)
            for response_id, _ in batch:
                self._pending.pop(response_id, None)
        if items:
            log.info("%d response records written to %s again", len(items), store.service.name)
        if self._lost:
            log.warning(
                "%d response records made while %s was away were dropped (more than %d "
                "waited); other workers will not find them",
                self._lost,
                store.service.name,
                PENDING,
            )
            self._lost = 0

    async def aclose(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
        if self._pending:
            log.warning(
                "%d response records made while their store was away go unwritten with this "
                "process (those in the database are still found)",
                len(self._pending),
            )
        if self._store is not None:
            await self._store.aclose()
            self._store = None


affinity = Affinity()


def response_id(content: bytes) -> str | None:
    """The id of a Responses API answer (JSON ``{"id": ..., "object": "response"}``)."""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    if isinstance(data, dict) and data.get("object") == "response":
        rid = data.get("id")
        if isinstance(rid, str) and rid:
            return rid
    return None


class StreamSniffer:
    """Finds the response id in a Responses stream: its ``response.created`` event's
    ``response.id``. Looks at the stream's first SNIFF_LIMIT bytes, then stops looking."""

    def __init__(self) -> None:
        self._seen = b""
        self.done = False

    def feed(self, chunk: bytes) -> str | None:
        if self.done:
            return None
        self._seen += chunk
        if len(self._seen) > SNIFF_LIMIT:
            self.done = True
            return None
        # Each complete event (a blank line ends it; servers write \n\n or \r\n\r\n).
        text = self._seen.replace(b"\r\n", b"\n")
        *events, _ = text.split(b"\n\n")
        for event in events:
            if b"response.created" not in event:
                continue
            data = b"".join(
                line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
            try:
                payload = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            response = payload.get("response") if isinstance(payload, dict) else None
            rid = response.get("id") if isinstance(response, dict) else None
            if isinstance(rid, str) and rid:
                self.done = True
                return rid
        return None
