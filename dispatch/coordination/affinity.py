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
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Protocol

import orjson
from django.conf import settings

log = logging.getLogger("hal0.affinity")

RECENT = 10_000  # ids this process remembers without asking the store
# How much of a stream is searched for its response.created event (it is the first event).
SNIFF_LIMIT = 64 * 1024


class Store(Protocol):
    async def remember(self, response_id: str, slot: str) -> None: ...

    async def lookup(self, response_id: str) -> str | None: ...

    async def aclose(self) -> None: ...


class Affinity:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._recent: OrderedDict[str, str] = OrderedDict()
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            if settings.REDIS_URL:
                from dispatch.coordination.affinity_redis import RedisAffinity

                self._store = RedisAffinity(settings.REDIS_URL)
            else:
                from dispatch.coordination.affinity_db import DatabaseAffinity

                self._store = DatabaseAffinity()
        return self._store

    def _keep(self, response_id: str, slot: str) -> None:
        self._recent[response_id] = slot
        self._recent.move_to_end(response_id)
        if len(self._recent) > RECENT:
            self._recent.popitem(last=False)

    async def remember(self, response_id: str, slot: str) -> None:
        self._keep(response_id, slot)
        try:
            await self.store.remember(response_id, slot)
        except Exception:
            # The answer is still the client's; only other workers will not find the id.
            log.warning("could not record response %s of slot %s", response_id, slot, exc_info=True)

    async def lookup(self, response_id: str) -> str | None:
        slot = self._recent.get(response_id)
        if slot is not None:
            return slot
        slot = await self.store.lookup(response_id)
        if slot is not None:
            self._keep(response_id, slot)
        return slot

    async def aclose(self) -> None:
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
