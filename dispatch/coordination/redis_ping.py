"""Whether Redis answers, for /healthz: one PING on a connection of its own, under a short
bound, so a Redis that is down or frozen makes the answer say so instead of making it wait."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

TIMEOUT_S = 0.5


async def answers(url: str, timeout: float = TIMEOUT_S) -> bool:
    # A connection of its own, closed at once: the channel layer's and the gate's pools
    # are theirs to size, and a health check every few seconds costs one connect.
    client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        async with asyncio.timeout(2 * timeout):
            return bool(await client.ping())
    except (aioredis.RedisError, OSError, TimeoutError):
        return False
    finally:
        await client.aclose()
