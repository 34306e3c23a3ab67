"""max_concurrency across processes, at the seam: dispatch.coordination.redis_places against a real Redis.

Two RedisPlaces objects stand for two worker processes: they share nothing but Redis."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from tests.fakes import free_port
from tests.processes import redis_url_or_skip

pytestmark = pytest.mark.redis


@pytest.fixture
def slot() -> str:
    return f"test-{secrets.token_hex(4)}"  # a key of its own in the shared Redis


async def test_a_place_held_past_its_ttl_is_renewed_and_returns_when_given_back(slot):
    from dispatch.coordination.redis_places import RedisPlaces

    url = redis_url_or_skip()
    one, two = RedisPlaces(url, ttl_s=0.6), RedisPlaces(url, ttl_s=0.6)
    try:
        assert await one.acquire(slot, 1, 0)
        await asyncio.sleep(1.5)  # 2.5 TTLs: only the renewals keep it
        assert not await two.acquire(slot, 1, 0.2)
        one.release(slot)
        assert await two.acquire(slot, 1, 1.0)  # given back at once, not at expiry
        two.release(slot)
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_place_nobody_renews_expires(slot):
    """A crashed worker renews nothing: its places come back after the TTL."""
    from dispatch.coordination.redis_places import RedisPlaces

    url = redis_url_or_skip()
    crashed, alive = RedisPlaces(url, ttl_s=0.5), RedisPlaces(url, ttl_s=0.5)
    assert await crashed.acquire(slot, 1, 0)
    await crashed.aclose()  # stops its renewer, as a dead process would
    assert not await alive.acquire(slot, 1, 0.1)
    assert await alive.acquire(slot, 1, 2.0)
    alive.release(slot)
    await alive.aclose()


async def test_with_redis_away_requests_are_let_through(slot, caplog):
    from dispatch.coordination.redis_places import RedisPlaces

    away = RedisPlaces(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert await away.acquire(slot, 1, 0.5)
        assert await away.acquire(slot, 1, 0.5)  # the local count is admission's job
        away.release(slot)
        away.release(slot)
    finally:
        await away.aclose()
    # Said once, as the outage began (dispatch.coordination.outages), not per request.
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "letting through" in warnings[0].getMessage()
    assert warnings[0].name == "hal0.outages" and warnings[0].exc_info is None
