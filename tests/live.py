"""What a page hears, event by event: after its snapshot the server sends batches
(``{"type": "batch", "missed": N, "events": [...]}``, dispatch.web.live.batch_event); the tests
read the events in them, in order."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from channels.testing import WebsocketCommunicator


def events_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a message from the socket carries: a batch's, or the message itself (the
    snapshot)."""
    if message.get("type") == "batch":
        return list(message["events"])
    return [message]


# What was read of each socket but not yet asked for: the rest of a batch.
_unread: weakref.WeakKeyDictionary[WebsocketCommunicator, list[dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


async def receive_events(
    comm: WebsocketCommunicator, n: int, timeout: float = 5.0
) -> list[dict[str, Any]]:
    """The next ``n`` events, whatever batches they come in (the rest of a batch waits for
    the next call)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    unread = _unread.setdefault(comm, [])
    while len(unread) < n:
        message = await comm.receive_json_from(timeout=max(0.01, deadline - loop.time()))
        unread.extend(events_of(message))
    taken = unread[:n]
    del unread[:n]
    return taken


async def next_event(
    comm: WebsocketCommunicator, kind: str, timeout: float = 5.0, **where: Any
) -> dict[str, Any]:
    """The next event of type ``kind`` (whose fields equal ``where``); others are skipped."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        (event,) = await receive_events(comm, 1, max(0.01, deadline - loop.time()))
        if event.get("type") == kind and all(event.get(k) == v for k, v in where.items()):
            return event


class Heard:
    """A page as the bus sees one (``events.Page``): what it was handed, tick by tick."""

    def __init__(self) -> None:
        self.deliveries: list[Any] = []
        self.paused = False  # told the layer (Redis) went away
        self._changed = asyncio.Event()

    def hear(self, delivery: Any) -> None:
        self.deliveries.append(delivery)
        self._changed.set()

    def away(self) -> None:
        self.paused = True
        self._changed.set()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for d in self.deliveries for e in d.events]

    @property
    def missed(self) -> int:
        return sum(d.missed for d in self.deliveries)

    async def until(self, events: int, missed: int = 0, timeout: float = 5.0) -> None:
        """Wait until it has heard ``events`` events and been told of ``missed`` missed."""
        async with asyncio.timeout(timeout):
            while len(self.events) < events or self.missed < missed:
                self._changed.clear()
                await self._changed.wait()
