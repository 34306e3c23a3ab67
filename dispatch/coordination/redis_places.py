"""Places on a slot across processes: ``max_concurrency`` held globally in Redis.

Each request on a limited slot takes a lease, a member of the slot's sorted set scored by
when it expires, and gives it back when it ends. A worker that crashes cannot give its
leases back: they expire within ``TTL_S``, so its places return within seconds. While a
request runs, its process renews its leases every ``TTL_S / 3``. Times come from the Redis
server's clock (``TIME`` inside the scripts), so hosts with skewed clocks agree.

Only slots with a limit pay for this (two round trips per request); in one process, or
without Redis, ``dispatch.upstream.admission`` alone counts places.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import weakref
from typing import Any

import redis.asyncio as aioredis

from dispatch.coordination import redis_pool
from dispatch.coordination.leases import IDENTITY
from dispatch.coordination.outages import REDIS

log = logging.getLogger("hal0.places")

TTL_S = 10.0
_UNCHECKED = ""  # a place let through while Redis was away: nothing to give back
_MAX_PAUSE_S = 0.2  # the longest a waiter sleeps between two tries

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
  return 1
end
return 0
"""
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000))
return 1
"""


def _key(slot: str) -> str:
    return f"hal0:places:{slot}"


class RedisPlaces:
    """The gate ``dispatch.upstream.admission`` consults for limited slots when Redis is configured."""

    def __init__(self, url: str, ttl_s: float = TTL_S) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self._ids = itertools.count(1)
        self._held: dict[str, list[str]] = {}
        # redis.asyncio clients belong to the loop they first ran on: one per loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._renewer: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A bounded pool that makes a request wait for a connection: redis-py's default
            # pool raises "Too many connections" under a burst instead.
            client = redis_pool.client(self.url)
            self._clients[loop] = client
        return client

    async def acquire(self, slot: str, limit: int, timeout: float) -> bool:
        """Take one of ``limit`` places on ``slot``; try again until ``timeout`` runs out.

        With Redis away the request is let through (this process's own count still holds):
        a router that stops routing because its bookkeeping is down helps nobody. Said once
        when the outage begins and once when it ends (``outages.REDIS``); while it lasts,
        Redis is not asked (a frozen one would cost each request its socket timeout).
        """
        lease = f"{IDENTITY}:{next(self._ids)}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.01
        client = self._client()
        while True:
            if not REDIS.available():
                REDIS.missed()
                return self._unchecked(slot)
            try:
                taken = await client.eval(_TAKE, 1, _key(slot), limit, self.ttl_s, lease)
            except REDIS.errors as exc:
                REDIS.failed(f"could not check the places on slot {slot}; letting through", exc)
                return self._unchecked(slot)
            except aioredis.RedisError as exc:  # Redis answered, but no: not an outage
                log.warning(
                    "places on slot %s not checked in Redis (%s); letting through", slot, exc
                )
                return self._unchecked(slot)
            REDIS.ok()
            if taken:
                self._held.setdefault(slot, []).append(lease)
                self._ensure_renewer()
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, _MAX_PAUSE_S)

    def _unchecked(self, slot: str) -> bool:
        self._held.setdefault(slot, []).append(_UNCHECKED)
        return True

    def release(self, slot: str) -> None:
        """Give one of this process's places on ``slot`` back (fire and forget)."""
        held = self._held.get(slot)
        if not held:
            return
        lease = held.pop()
        if not held:
            self._held.pop(slot, None)
        if lease == _UNCHECKED:
            return
        task = asyncio.get_running_loop().create_task(self._give_back(slot, lease))
        self._pending.add(task)  # keep a reference until it has run
        task.add_done_callback(self._pending.discard)

    async def _give_back(self, slot: str, lease: str) -> None:
        if not REDIS.available():  # the lease expires on its own within TTL_S
            REDIS.missed()
            return
        try:
            await self._client().zrem(_key(slot), lease)
        except REDIS.errors as exc:
            REDIS.failed(f"could not give back a place on slot {slot}", exc)
        except Exception:
            log.warning("could not give back a place on slot %s", slot, exc_info=True)

    def _ensure_renewer(self) -> None:
        loop = asyncio.get_running_loop()
        if self._renewer is None or self._renewer.done() or self._renewer.get_loop() is not loop:
            self._renewer = loop.create_task(self._renew())

    async def _renew(self) -> None:
        while self._held:
            await asyncio.sleep(self.ttl_s / 3)
            for slot, held in list(self._held.items()):
                leases = [lease for lease in held if lease != _UNCHECKED]
                if not leases:
                    continue
                # Tried again in a third of the TTL, before anything expires.
                if not REDIS.available():
                    REDIS.missed()
                    continue
                try:
                    await self._client().eval(_RENEW, 1, _key(slot), self.ttl_s, *leases)
                except REDIS.errors as exc:
                    REDIS.failed(f"could not renew the places on slot {slot}", exc)
                except Exception:
                    log.warning("could not renew the places on slot %s", slot, exc_info=True)

    async def aclose(self) -> None:
        for task in (self._renewer, *self._pending):
            if task is not None:
                task.cancel()
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
