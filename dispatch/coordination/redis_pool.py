"""A Redis client on a bounded pool that makes a caller wait for a connection.

redis-py's default pool grows to 100 connections and then raises "Too many connections"
(a ``ConnectionError``: read as Redis being away) under a burst; this one holds
``MAX_CONNECTIONS`` per process and makes the rest wait up to ``WAIT_S``.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

MAX_CONNECTIONS = 32  # per process and loop
WAIT_S = 5.0  # for a free connection, and for Redis's answer


def client(url: str, **options: Any) -> Any:
    """A client of its own pool (the client closes it), for the running loop only."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=WAIT_S,
        socket_timeout=WAIT_S,
        socket_connect_timeout=WAIT_S,
        **options,
    )
    return aioredis.Redis.from_pool(pool)
