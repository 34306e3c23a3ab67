"""Redis clients on a bounded pool (dispatch/coordination/redis_pool.py): a burst waits for a
connection. redis-py's default pool raises "Too many connections" past 100, a
ConnectionError that hal0web would read as Redis being away (503s, a false outage)."""

from __future__ import annotations

import asyncio

import pytest

from dispatch.coordination import outages
from dispatch.coordination.affinity_redis import RedisAffinity
from dispatch.coordination.redis_places import RedisPlaces
from tests.processes import redis_url_or_skip

BURST = 300  # at once, past redis-py's default pool of 100


@pytest.mark.redis
async def test_a_burst_of_response_lookups_waits_for_connections(settings) -> None:
    store = RedisAffinity(redis_url_or_skip())
    try:
        await store.remember("resp_burst", "slot-a")
        found = await asyncio.gather(*(store.lookup("resp_burst") for _ in range(BURST)))
        assert found == ["slot-a"] * BURST
        assert not outages.REDIS.away
    finally:
        await store.aclose()


@pytest.mark.redis
async def test_a_burst_of_places_waits_for_connections(settings) -> None:
    places = RedisPlaces(redis_url_or_skip())
    try:
        taken = await asyncio.gather(
            *(places.acquire("burst-slot", BURST, timeout=5) for _ in range(BURST))
        )
        assert all(taken) and not outages.REDIS.away
    finally:
        await places.aclose()
