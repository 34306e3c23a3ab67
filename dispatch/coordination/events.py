"""The only module that talks to the channel layer: the bus.

Everything the live UI hears goes through here (built by the live feed, ``dispatch.web.live``):
decisions to the staff's pages and to the asking user's, in-flight counts to every page, table
changes to the pages of the process whose table changed. The processes' own messages ride it
too (a commit waking every version check, a poke for the watcher). Sends are fire and forget:
an event never delays or fails the request or the database write that caused it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

from dispatch.coordination.outages import REDIS

GROUP = "dispatch"
# Who may see which decision (issue 14): staff pages hear every one; any other user's pages
# hear only their own requests', in a group per user. A page joins one or the other, so what
# it must not see is never even sent to it (not sent and then filtered).
STAFF_GROUP = "dispatch.staff"
# Every process's version check listens here: a commit anywhere wakes it at once.
SYNC_GROUP = "hal0.sync"
# The leading watcher's ear: pokes from other processes (a request that failed there).
WATCHER_GROUP = "hal0.watcher"
# This process's own pages. A change to the table reaches every process
# (dispatch.coordination.sync), and each tells its own pages what its table now holds: sent
# to GROUP, a page would hear each change once from every process. Decisions are made once,
# by one process, so they go to GROUP for every page.
LOCAL_GROUP = f"dispatch.local.{os.getpid()}.{secrets.token_hex(4)}"
# How often ``listen`` joins its group again (channels-redis forgets a member after a day).
REJOIN_S = 3600.0
log = logging.getLogger("hal0.events")

# Events published from async code wait here for the one task that sends them, in order.
# Bounded: a channel layer that stalls (Redis away) must not grow memory without end; what
# does not fit is dropped and counted (hal0_events_dropped_total).
QUEUE_LIMIT = 10_000
_queue: deque[tuple[dict[str, Any], str]] = deque()
_dropped = 0


def dropped() -> int:
    """Events dropped because the send queue was full, since the process started."""
    return _dropped


_sender: asyncio.Task[None] | None = None
# The loop the server runs on. The in-memory layer's queues belong to it, so sends from
# other threads (the admin's sync views, the watcher's database writes) are handed to it.
_home: asyncio.AbstractEventLoop | None = None


def bind_loop(loop: asyncio.AbstractEventLoop) -> None:
    global _home
    _home = loop


def _message(event: dict[str, Any]) -> dict[str, Any]:
    # "type" routes the message to the consumer's handler; the event rides inside.
    return {"type": "dispatch.event", "event": event}


async def send(event: dict[str, Any], group: str = GROUP) -> None:
    global _dropped
    layer = get_channel_layer()
    if layer is None:
        return
    redis = _on_redis(layer)
    if redis and not REDIS.available():  # away: dropped at once, not after a timeout each
        REDIS.missed()
        _dropped += 1
        return
    try:
        await layer.group_send(group, _message(event))
    except Exception as exc:  # a broken layer must not break routing; say so and go on
        if redis and isinstance(exc, REDIS.errors):  # once per outage, not per event
            REDIS.failed(f"could not broadcast {event.get('type')}", exc)
            _dropped += 1
        else:
            log.warning("could not broadcast %s", event.get("type"), exc_info=True)
        return
    if redis:
        REDIS.ok()


class BusAway(Exception):
    """The channel layer (Redis) cannot be reached: a page cannot hear anything now."""


def _on_redis(layer: Any) -> bool:
    """Whether ``layer`` lives in Redis (outages.REDIS); the in-memory layer is this
    process's own and cannot be away."""
    return not isinstance(layer, InMemoryChannelLayer)


def user_group(username: str) -> str:
    """The group of one user's pages. Usernames may hold characters group names may not
    (``@``, ``+``, non-ASCII), so the name is hashed."""
    return "dispatch.user." + hashlib.sha256(username.encode()).hexdigest()[:32]


def publish_decision(event: dict[str, Any], client: str | None) -> None:
    """A decision for the staff's pages and, when a page user asked, for that user's."""
    publish(event, STAFF_GROUP)
    if client is not None and client.startswith("user:"):
        publish(event, user_group(client.removeprefix("user:")))


def _unheard(group: str) -> bool:
    """Whether nobody anywhere can hear ``group``: the in-memory layer is this process's
    alone, so a group with no member here has none at all (the embedded default, no page
    open). Sending to it anyway made a task and a clean-up sweep of the layer per request
    (bench/served.py: ~4 % of a request's instructions). Any other layer is asked."""
    layer = get_channel_layer()
    return isinstance(layer, InMemoryChannelLayer) and group not in layer.groups


def publish(event: dict[str, Any], group: str = GROUP) -> None:
    """From async code: queue the send and return at once.

    One task sends whatever is queued, oldest first, and ends when the queue is empty: under
    load a burst of events costs one task, not one each (one per request, on /v1).
    """
    global _sender, _dropped
    if _unheard(group):
        return
    loop = asyncio.get_running_loop()
    if _sender is not None and _sender.get_loop() is not loop:
        # A sender left on another loop (a finished test's, a restarted server's) will never
        # run again, and what it had queued was for the pages that loop served.
        _queue.clear()
        _sender = None
    if len(_queue) >= QUEUE_LIMIT:
        _dropped += 1
        return
    _queue.append((event, group))
    if _sender is None or _sender.done():
        _sender = loop.create_task(_send_queued())


async def _send_queued() -> None:
    while _queue:
        await send(*_queue.popleft())


def tell_own_pages(event: dict[str, Any]) -> None:
    """From sync code (after a reload): send to this process's pages."""
    send_from_sync(event, LOCAL_GROUP)


def tell_every_process(event: dict[str, Any]) -> None:
    """From sync code (after a commit): wake every process's version check at once."""
    send_from_sync(event, SYNC_GROUP)


def send_from_sync(event: dict[str, Any], group: str) -> None:
    """Send from sync code, bridging into the server's event loop when one runs."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None and (running is _home or _home is None):
        publish(event, group)  # already on the loop: schedule, don't block it
    elif _home is not None and _home.is_running():
        # Into the one send queue, in order: a coroutine each, a reload that changed 200
        # slots sent 200 at once and ran redis-py's pool (100 connections) dry.
        _home.call_soon_threadsafe(publish, event, group)
    else:
        async_to_sync(send)(event, group)


def _page_groups(staff: bool, username: str) -> tuple[str, ...]:
    return (GROUP, LOCAL_GROUP, STAFF_GROUP if staff else user_group(username))


async def join(channel_name: str, *, staff: bool, username: str) -> None:
    """A page joins: it hears the in-flight counts, the table changes of its own process, and
    every decision (staff) or its user's own. BusAway when the layer (Redis) is away."""
    layer = get_channel_layer()
    if layer is None:
        return
    redis = _on_redis(layer)
    if redis and not REDIS.available():
        REDIS.missed()
        raise BusAway
    try:
        for group in _page_groups(staff, username):
            await layer.group_add(group, channel_name)
    except REDIS.errors as exc:
        if not redis:
            raise
        REDIS.failed("a page could not join the live feed", exc)
        raise BusAway from exc
    if redis:
        REDIS.ok()


async def leave(channel_name: str, *, staff: bool, username: str) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    redis = _on_redis(layer)
    if redis and not REDIS.available():
        # Nothing to undo that matters: a membership expires (channels-redis forgets it
        # after a day), and a Redis that restarted has forgotten it already.
        REDIS.missed()
        return
    try:
        for group in _page_groups(staff, username):
            await layer.group_discard(group, channel_name)
    except REDIS.errors as exc:
        if not redis:
            raise
        REDIS.failed("a page could not leave the live feed", exc)


BUS_AWAY = "dispatch.bus.away"  # the message a page's consumer gets when the layer is away


def guarded(
    receive: Callable[[], Awaitable[dict[str, Any]]],
) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A page's receive from the layer that never raises for an outage: the first failure
    comes as one ``BUS_AWAY`` message (its consumer closes the page), after which it waits
    until cancelled (the consumer ends with its socket)."""
    failed = False

    async def receive_guarded() -> dict[str, Any]:
        nonlocal failed
        if not failed:
            try:
                return await receive()
            except REDIS.errors as exc:
                failed = True
                REDIS.failed("a page's live feed stopped", exc)
                return {"type": BUS_AWAY}
        await asyncio.Future()  # never set: cancelled when the consumer ends
        raise AssertionError("unreachable")

    return receive_guarded


async def listen(group: str, handle: Callable[[dict[str, Any]], None]) -> None:
    """Hear what is sent to ``group`` until cancelled; ``handle`` gets each event."""
    layer = get_channel_layer()
    if layer is None:
        return
    redis = _on_redis(layer)
    channel = await layer.new_channel()
    try:
        while True:
            rejoin = asyncio.timeout(REJOIN_S)
            try:
                # Joined again now and then: channels-redis forgets a member after a day,
                # and a Redis that was away may have forgotten everything.
                await layer.group_add(group, channel)
                if redis:
                    REDIS.ok()
                async with rejoin:
                    while True:
                        message = await layer.receive(channel)
                        handle(message.get("event") or {})
            except REDIS.errors as exc:
                if rejoin.expired():
                    continue
                if not redis:
                    raise
                # Heard again once Redis is back (its probe says when): never a dead task.
                REDIS.failed(f"could not hear {group}", exc)
                await REDIS.back()
    finally:
        try:
            await layer.group_discard(group, channel)
        except Exception:  # the layer may be gone with the loop; nothing is left to undo
            log.debug("could not leave %s", group, exc_info=True)
