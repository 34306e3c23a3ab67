"""How every process converges on one state: the slots, their models and the API keys.

Each process keeps that state in memory (``store.table``, ``keyring``) so a request never
queries the database. Any change bumps ``StateVersion`` in the same transaction
(``dispatch.signals``); the process that committed reloads at once, and every other process
— another worker, the watcher, the server behind a ``manage.py shell`` — sees the new
number within ``VERSION_CHECK_S`` and reloads. The committing process also announces the
commit over the channel layer, which wakes every process's check at once; the check itself
is one indexed one-row read, so it runs often as the safety net for a missed announcement.
A full reload happens only when the number moved.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, transaction

from dispatch.coordination import events, outages
from dispatch.coordination.keyring import keyring
from dispatch.coordination.store import store
from dispatch.lib.listeners import Listeners

log = logging.getLogger("hal0.sync")

# How often each process compares its version with the database's: the bound on how long
# a change committed elsewhere takes to reach it (issue 12 asks for 1 s at p99).
VERSION_CHECK_S = 0.25
# A process that could not check for this long says its table is stale (decisions, /healthz).
STALE_AFTER_S = 3.0
# Slot state older than this many probe intervals is stale: the watcher is not keeping it.
# An interval under a second still allows 3 s: one probe may take its 0.5 s timeout on top
# of the interval, and the heartbeat and this check each add a tick.
STALE_PROBES = 3
STALE_MIN_S = 3.0


# Told ``store.freshness()`` when the slot state turns stale or fresh again (the live feed
# tells this process's pages: dispatch.web.live).
freshness_changed: Listeners[[dict[str, object]]] = Listeners("the freshness")


# Told each piece of the leading loader's news (dispatch.lifecycle.loader), heard by every
# process: which model a slot is loading and how far, which it is evicting, and the queue of
# requests waiting on it, in order. A waiting request reads its place from it
# (dispatch.upstream.loads), the live feed shows it (dispatch.web.live). Ephemeral: what
# lasts (a model's load state) is in the database like any other state.
#   {"type": "loads", "slot": str, states.LOAD_LOADING: str | None, "progress": float | None,
#    "evicting": str | None, "queue": [{"ticket": str, "model": str, "since": float}, ...],
#    "failed": {ticket: reason}, "at": float}
loads_news: Listeners[[dict[str, object]]] = Listeners("the loader's news")


def stale_after_s(probe_interval_s: float) -> float:
    return max(STALE_PROBES * probe_interval_s, STALE_MIN_S)


def reload_all() -> None:
    """Rebuild everything held in memory from the database (sync: not on the event loop)."""
    store.reload()
    keyring.reload()


def committed() -> None:
    """After this process committed a change: wake every other process's check (over the
    channel layer) so it need not wait for its next tick, and reload here. The wake goes
    first: the others reload while this one does, and it is not sent after this reload's
    events for the pages (a round that changed 200 slots is 200 of them, sent in order).
    The wake names the version committed: a process that cannot load it knows its table
    lags what the others route by (/healthz says so)."""
    from dispatch.models import StateVersion

    events.tell_every_process({"type": "version", "number": StateVersion.current()})
    reload_all()


def reload_after_commit() -> None:
    """Have this process reload once the transaction under way commits: once, however many
    rows it writes (an import writes hundreds, a probe round thousands). Nothing if it rolls
    back: Django drops the callback with it."""
    conn = transaction.get_connection()
    if any(func is committed for _, func, _ in conn.run_on_commit):
        return
    transaction.on_commit(committed)


def catch_up() -> bool:
    """Reload if the database holds another version than this process. True if it did."""
    from dispatch.models import StateVersion

    # Runs in asgiref's long-lived thread, outside any request: Django's per-request
    # connection housekeeping never reaches it.
    close_old_connections()
    number, probed_at, watcher = StateVersion.read()
    store.mark_checked(probed_at, watcher, number)
    if number == store.table.version and number == keyring.version:
        return False
    reload_all()
    return True


async def follow() -> None:
    """Check the version every ``VERSION_CHECK_S``, for as long as the loop runs, and tell
    ``freshness_changed`` when the slot state turns stale or fresh again."""
    store.follow(
        max_age=STALE_AFTER_S, heartbeat_max_age=stale_after_s(settings.HAL0_PROBE_INTERVAL_S)
    )
    was_stale = store.stale
    wake = asyncio.Event()

    def heard(event: dict[str, object]) -> None:
        if event.get("type") == "loads":
            loads_news.notify(event)
            return
        number = event.get("number")
        if event.get("type") == "version" and type(number) is int:
            # Another process committed it: should this one fail to load it while they
            # route by it, its table lies (/healthz says so).
            store.saw_version(number, told=True)
        wake.set()

    listener = asyncio.get_running_loop().create_task(events.listen(events.SYNC_GROUP, heard))
    try:
        await _follow(wake, was_stale)
    finally:
        listener.cancel()


async def _follow(wake: asyncio.Event, was_stale: bool) -> None:
    while True:
        try:
            await asyncio.wait_for(wake.wait(), VERSION_CHECK_S)
        except TimeoutError:
            pass
        wake.clear()
        try:
            await sync_to_async(catch_up, thread_sensitive=True)()
        except Exception as exc:  # the database may be briefly away; the next check tries again
            store.unreadable()
            if isinstance(exc, outages.DATABASE.errors):
                # One warning when the outage begins and one when it ends (its probe), not
                # a traceback every 0.25 s.
                outages.DATABASE.failed("checking the state version", exc)
            else:
                log.warning("could not check the state version", exc_info=True)
        if store.stale != was_stale:
            was_stale = store.stale
            freshness = store.freshness()
            if was_stale:
                log.warning("slot state is stale: %s", freshness)
            freshness_changed.notify(freshness)


_follower: asyncio.Task[None] | None = None


def ensure_following() -> None:
    """Start :func:`follow` on the running loop unless it already runs there."""
    global _follower
    loop = asyncio.get_running_loop()
    if _follower is not None and not _follower.done() and _follower.get_loop() is loop:
        return
    _follower = loop.create_task(follow(), name="hal0-sync", context=contextvars.Context())


async def stop_following() -> None:
    global _follower
    if _follower is not None:
        _follower.cancel()
        await asyncio.gather(_follower, return_exceptions=True)
        _follower = None
