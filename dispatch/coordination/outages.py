"""The shared services a process leans on (Redis, the database), as this process sees them:
up, or away since when.

Whoever calls a service reports an outage (``failed``) when a call cannot reach it. The
first report logs one warning; from then on callers ask ``available()`` and do without it
(the bus drops its events, affinity uses the other store or memory, the max_concurrency gate
lets the local count hold), so a frozen Redis costs its socket timeout once, not once per
call. One probe task per service asks it every ``RETRY_S`` with a short timeout; the first
answer ends the outage with one more warning and wakes whoever waits (``back``). A traceback
per failed call said nothing the first warning had not (issue 24: ~1,800 for a 10 s outage).

A request that needs what is away answers 503 with ``Retry-After`` and a code naming it
(``Unavailable``, turned into the client's protocol by the API).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from dispatch.lib.listeners import Listeners
from dispatch.lib.redact import masked

log = logging.getLogger("hal0.outages")

RETRY_S = 1.0  # how often an away service is asked again
PROBE_TIMEOUT_S = 1.0
# What a client is told to wait before trying again (a probe or two later).
RETRY_AFTER_S = 2


class Unavailable(Exception):
    """What a request needs is away: the client gets 503, ``Retry-After`` and ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import ConnectionError, TimeoutError
    except ImportError:  # no Redis client installed: nothing can fail to reach it
        return (OSError, asyncio.TimeoutError)
    return (ConnectionError, TimeoutError, OSError, asyncio.TimeoutError)


def _database_errors() -> tuple[type[BaseException], ...]:
    from django.db import InterfaceError, OperationalError

    return (OperationalError, InterfaceError)


class Service:
    """One shared service's reachability in this process."""

    def __init__(
        self,
        name: str,
        errors: Callable[[], tuple[type[BaseException], ...]],
        probe: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self._errors = errors
        self._probe = probe
        # Told when an outage ends, on the loop that saw it end (what waited is written now).
        self.returned: Listeners[[Service]] = Listeners(f"{name}'s return")
        self.reset()

    def reset(self) -> None:
        self._since: float | None = None  # monotonic time the outage began
        self._missed = 0  # calls failed or done without while away
        self._prober: asyncio.Task[None] | None = None
        self._back: asyncio.Event | None = None

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean "cannot reach it" (anything else is a bug, not an outage)."""
        return self._errors()

    @property
    def away(self) -> bool:
        return self._since is not None

    def available(self) -> bool:
        """Whether to call the service now: up, or away with nobody watching for its return
        (its probe's loop is gone), when the call itself is the probe."""
        if self._since is None:
            return True
        prober = self._prober
        return prober is None or prober.done() or prober.get_loop().is_closed()

    def missed(self) -> None:
        """A call done without while away (counted for the warning that ends the outage)."""
        self._missed += 1

    def failed(self, what: str, exc: BaseException) -> None:
        """A call could not reach the service (``what``: what could not be done)."""
        self._missed += 1
        if self._since is None:
            self._since = time.monotonic()
            log.warning(
                "%s is away (%s: %s); doing without it, asking again every %g s",
                self.name,
                what,
                _said(exc),
                RETRY_S,
            )
        self._watch()

    def ok(self) -> None:
        """A call reached the service: an outage, if any, is over."""
        if self._since is None:
            return
        took, missed = time.monotonic() - self._since, self._missed
        self._since, self._missed = None, 0
        log.warning("%s is back after %.1f s (%d calls done without it)", self.name, took, missed)
        if self._back is not None:
            self._back.set()
        self._back = None
        self.returned.notify(self)

    async def back(self) -> None:
        """Wait until the service is up (at once when it is)."""
        if self._since is None:
            return
        if self._back is None or _other_loop(self._back):
            self._back = asyncio.Event()
        self._watch()
        await self._back.wait()

    def _watch(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a sync caller: the next async one (or call) watches
            return
        prober = self._prober
        if prober is not None and not prober.done() and prober.get_loop() is loop:
            return
        self._prober = loop.create_task(self._probing(), name=f"hal0-probe-{self.name}")

    async def _probing(self) -> None:
        while self._since is not None:
            await asyncio.sleep(RETRY_S)
            try:
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    await self._probe()
            except asyncio.CancelledError:
                raise
            except Exception:  # still away: the first warning said so
                continue
            self.ok()


def _other_loop(event: asyncio.Event) -> bool:
    # An Event is bound to the loop that first waited on it (a finished test's, say).
    bound = getattr(event, "_loop", None)
    return bound is not None and bound is not asyncio.get_running_loop()


def _said(exc: BaseException) -> str:
    text = masked(str(exc).strip())  # a URL's credentials, should a driver quote one
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _ping_redis() -> None:
    from django.conf import settings

    if not settings.REDIS_URL:
        return
    from dispatch.coordination import redis_ping  # the Redis client: the scale extra's

    if not await redis_ping.answers(settings.REDIS_URL, PROBE_TIMEOUT_S / 2):
        raise ConnectionError("Redis does not answer a PING")


def _select_one() -> None:
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()  # a probe thread's own connection, not kept


# The database's probe runs in a thread of its own, not asgiref's shared one (a hung database
# must not hold what queues there) nor the loop's default executor (DNS lookups wait there);
# one probe at a time: a probe still hanging is waited for again, not joined by another.
_database_prober = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hal0-db-probe")
_database_probe: asyncio.Future[None] | None = None


async def _ping_database() -> None:
    global _database_probe
    probe = _database_probe
    if probe is None or probe.done() or probe.get_loop() is not asyncio.get_running_loop():
        probe = asyncio.get_running_loop().run_in_executor(_database_prober, _select_one)
        # Its failure is seen by whoever waits for it, if anyone still does: never "never
        # retrieved".
        probe.add_done_callback(lambda done: done.cancelled() or done.exception())
        _database_probe = probe
    await asyncio.shield(probe)  # a probe that times out goes on; the next one waits for it


REDIS = Service("Redis", _redis_errors, _ping_redis)
DATABASE = Service("the database", _database_errors, _ping_database)
SERVICES = (REDIS, DATABASE)


def reset() -> None:
    for service in SERVICES:
        service.reset()
