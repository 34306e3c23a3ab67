"""The live UI's WebSocket: a snapshot on connect, then the dispatch events in batches.

What a page hears depends on who is looking (issue 14): staff see every decision and each
slot's URL; any other user sees the decisions of their own requests only (``events.join``
puts the page in its user's group, not the staff's) and no slot URLs, which may name hosts
and ports of the machines behind hal0web.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer

from dispatch.coordination import events
from dispatch.coordination.store import store
from dispatch.upstream.admission import admission
from dispatch.upstream.outliers import outliers
from dispatch.web.live import batch_event, loader_news
from dispatch.web.snapshots import snapshot


def _public_slot(slot: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in slot.items() if k != "url"}
    # A probe's error quotes the host it could not reach ("Cannot connect to host 10.0.0.7:8002
    # ..."): the part of the URL a non-staff page must not learn from the error either; nor
    # from why a model's load failed.
    host = urlsplit(slot.get("url") or "").hostname
    if not host:
        return out

    def hidden(text: str) -> str:
        return re.sub(re.escape(host), "(the slot's host)", text, flags=re.I)

    if isinstance(out.get("last_error"), str):
        out["last_error"] = hidden(out["last_error"])
    if isinstance(out.get("models"), list):
        out["models"] = [
            {**m, "load_error": hidden(m["load_error"])}
            if isinstance(m, dict) and isinstance(m.get("load_error"), str)
            else m
            for m in out["models"]
        ]
    return out


def without_urls(event: dict[str, Any]) -> dict[str, Any]:
    """The event as a non-staff page sees it: each slot's payload without its ``url``."""
    if isinstance(event.get("slot"), dict):  # slot.state / slot.models / slot.updated
        return {**event, "slot": _public_slot(event["slot"])}
    if isinstance(event.get("slots"), list):  # the snapshot
        return {**event, "slots": [_public_slot(s) for s in event["slots"]]}
    return event


# A page that falls this many deliveries behind (about this many ticks: seconds) lets the
# oldest go, and is told how many events it missed with the next one it gets.
OUTBOX_LIMIT = 50
# The close code of a page whose live feed cannot run: the channel layer (Redis) is away.
# The page says "live updates paused" and connects again every second or two (a private
# code: 4000-4999 are the application's; 503 as HTTP's "unavailable").
LIVE_PAUSED = 4503


class DispatchConsumer(AsyncWebsocketConsumer):
    # No channel of its own: the page hears the bus through events.join, which hands it what
    # this process's one channel for its pages hears (dispatch.coordination.events._Hub).
    # An alias no layer is configured under gives a consumer none.
    channel_layer_alias = "hal0.pages-have-no-channel"
    staff = False
    username = ""
    bus_away = False  # the layer is away: this page hears nothing, and is told so
    _joined = _closed = False
    _sender: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        # Read once per connection, like the session itself: a user made staff (or no longer)
        # sees accordingly from their next connection, which the page opens on any drop.
        self.staff, self.username = bool(user.is_staff), user.get_username()
        self._outbox: deque[events.Delivery] = deque()
        self._wake = asyncio.Event()
        self._owed = 0
        # Join first, then read the table: a change in between arrives as a delta after the
        # snapshot instead of being lost (what the page hears meanwhile waits in its outbox).
        try:
            await events.join(self, staff=self.staff, username=self.username)
            self._joined = True
        except events.BusAway:
            self.bus_away = True
        await self.accept()
        # The table is in memory, Redis or not: the page shows it, paused when it must be.
        await self._send_snapshot()
        if self.bus_away:
            await self._pause()
        else:
            self._sender = asyncio.get_running_loop().create_task(self._send_deliveries())

    def away(self) -> None:
        """The layer went away under this page (``events.Page``): it hears nothing now, and
        is closed with LIVE_PAUSED by its sender (by connect, if that has not started)."""
        self.bus_away = True
        self._wake.set()

    async def _pause(self) -> None:
        if not self._closed:
            self._closed = True
            await self.close(code=LIVE_PAUSED, reason="live updates paused: Redis is away")

    async def disconnect(self, code: int) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self._joined:  # refused connections never joined
            await events.leave(self)

    def hear(self, delivery: events.Delivery) -> None:
        """What the page's groups brought this tick (events.Page): queued for its sender, so
        a page that cannot keep up falls behind alone."""
        if len(self._outbox) >= OUTBOX_LIMIT:
            late = self._outbox.popleft()
            self._owed += len(late.events) + late.missed
            events.count_missed(len(late.events))  # its `missed` was counted when delivered
        self._outbox.append(delivery)
        self._wake.set()

    async def _send_deliveries(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.bus_away:
                await self._pause()
                return
            while self._outbox:
                delivery = self._outbox.popleft()
                if self._owed:
                    text = self._batch_text(delivery.events, delivery.missed + self._owed)
                    self._owed = 0
                else:
                    # The same for every page of its audience (their groups, hence whether
                    # they are staff's): made by the first of them.
                    if delivery.text is None:
                        delivery.text = self._batch_text(delivery.events, delivery.missed)
                    text = delivery.text
                await self.send(text_data=text)

    def _batch_text(self, evs: list[dict[str, Any]], missed: int) -> str:
        seen = evs if self.staff else [without_urls(e) for e in evs]
        return orjson.dumps(batch_event(seen, missed)).decode()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # The page may ask for a fresh snapshot (for current in-flight counts, say). Anything
        # else, malformed JSON included, is ignored: a client's noise must not close the socket.
        try:
            message = orjson.loads(text_data or bytes_data or b"")
        except orjson.JSONDecodeError:
            return
        if isinstance(message, dict) and message.get("type") == "snapshot":
            await self._send_snapshot()

    async def _send_snapshot(self) -> None:
        table = await store.ensure_loaded()
        event = snapshot(
            table,
            admission.inflight,
            store.freshness(),
            outliers.overlay(),
            loader_news.latest(table.slots),
        )
        if self.bus_away:
            event["paused"] = True  # no live updates follow: the socket closes (LIVE_PAUSED)
        await self._send_event(event)

    async def _send_event(self, event: dict[str, Any]) -> None:
        await self.send(
            text_data=orjson.dumps(event if self.staff else without_urls(event)).decode()
        )
