"""Response affinity in Redis: one key per response, expiring after the retention bound."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from django.conf import settings

from dispatch.coordination import redis_pool
from dispatch.coordination.outages import REDIS


def _key(response_id: str) -> str:
    return f"hal0:response:{response_id}"


def _ttl() -> int:
    return max(1, int(settings.HAL0_RESPONSE_RETENTION_DAYS * 86400))


class RedisAffinity:
    service = REDIS
    volatile = True  # a Redis restarted without persistence comes back empty

    def __init__(self, url: str) -> None:
        self.url = url
        # redis.asyncio clients belong to the loop they first ran on: one per loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # Bounded: a burst of lookups waits for a connection instead of failing as if
            # Redis were away.
            client = redis_pool.client(self.url, decode_responses=True)
            self._clients[loop] = client
        return client

    async def remember(self, response_id: str, slot: str) -> None:
        await self._client().set(_key(response_id), slot, ex=_ttl())

    async def remember_many(self, records: list[tuple[str, str]]) -> None:
        ttl = _ttl()
        async with self._client().pipeline(transaction=False) as pipe:
            for response_id, slot in records:
                pipe.set(_key(response_id), slot, ex=ttl)
            await pipe.execute()

    async def lookup(self, response_id: str) -> str | None:
        found = await self._client().get(_key(response_id))
        return found if isinstance(found, str) else None

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.aclose()
