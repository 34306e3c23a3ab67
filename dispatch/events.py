"""The only module that talks to the channel layer.

Everything the live UI hears goes through here, to one group. Sends are fire and forget: an
event never delays or fails the request or the database write that caused it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

GROUP = "dispatch"
log = logging.getLogger("hal0.events")

# Events published from async code wait here for the one task that sends them, in order.
# Bounded: a channel layer that stalls (Redis away) must not grow memory without end; what
# does not fit is dropped and counted (hal0_events_dropped_total).
QUEUE_LIMIT = 10_000
_queue: deque[dict[str, Any]] = deque()
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


async def send(event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(GROUP, _message(event))
    except Exception:  # a broken layer must not break routing; say so and go on
        log.warning("could not broadcast %s", event.get("type"), exc_info=True)


def publish(event: dict[str, Any]) -> None:
    """From async code: queue the send and return at once.

    One task sends whatever is queued, oldest first, and ends when the queue is empty: under
    load a burst of events costs one task, not one each (one per request, on /v1).
    """
    global _sender, _dropped
    loop = asyncio.get_running_loop()
    if _sender is not None and _sender.get_loop() is not loop:
        # A sender left on another loop (a finished test's, a restarted server's) will never
        # run again, and what it had queued was for the pages that loop served.
        _queue.clear()
        _sender = None
    if len(_queue) >= QUEUE_LIMIT:
        _dropped += 1
        return
    _queue.append(event)
    if _sender is None or _sender.done():
        _sender = loop.create_task(_send_queued())


async def _send_queued() -> None:
    while _queue:
        await send(_queue.popleft())


def broadcast(event: dict[str, Any]) -> None:
    """From sync code (after a commit): send, bridging into the server's event loop."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None and (running is _home or _home is None):
        publish(event)  # already on the loop: schedule, don't block it
    elif _home is not None and _home.is_running():
        asyncio.run_coroutine_threadsafe(send(event), _home)
    else:
        async_to_sync(send)(event)


async def join(channel_name: str) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_add(GROUP, channel_name)


async def leave(channel_name: str) -> None:
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_discard(GROUP, channel_name)
