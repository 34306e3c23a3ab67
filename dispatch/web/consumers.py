"""The live UI's WebSocket: a snapshot on connect, then every dispatch event as it happens.

What a page hears depends on who is looking (issue 14): staff see every decision and each
slot's URL; any other user sees the decisions of their own requests only (``events.join``
puts the page in its user's group, not the staff's) and no slot URLs, which may name hosts
and ports of the machines behind hal0web.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer

from dispatch.coordination import events
from dispatch.coordination.store import store
from dispatch.upstream.admission import admission
from dispatch.upstream.outliers import outliers
from dispatch.web.live import loader_news
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


# The close code of a page whose live feed cannot run: the channel layer (Redis) is away.
# The page says "live updates paused" and connects again every second or two (a private
# code: 4000-4999 are the application's; 503 as HTTP's "unavailable").
LIVE_PAUSED = 4503


class DispatchConsumer(AsyncWebsocketConsumer):
    staff = False
    username = ""
    bus_away = False  # the layer is away: this page hears nothing, and is told so
    _accepted = _closed = False

    # Channels' consumer loop receives from the layer through this attribute; it raised
    # out of the application when Redis went away (a handshake answered 500, an open page
    # cut with 1011, a traceback each). Guarded, an outage arrives as one message instead.
    @property
    def channel_receive(self) -> Callable[[], Awaitable[dict[str, Any]]]:
        return self._channel_receive

    @channel_receive.setter
    def channel_receive(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self._channel_receive = events.guarded(receive)

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        # Read once per connection, like the session itself: a user made staff (or no longer)
        # sees accordingly from their next connection, which the page opens on any drop.
        self.staff, self.username = bool(user.is_staff), user.get_username()
        # Join first, then read the table: a change in between arrives as a delta after the
        # snapshot instead of being lost.
        try:
            await events.join(self.channel_name, staff=self.staff, username=self.username)
        except events.BusAway:
            self.bus_away = True
        await self.accept()
        self._accepted = True
        # The table is in memory, Redis or not: the page shows it, paused when it must be.
        await self._send_snapshot()
        if self.bus_away:
            await self._pause()

    async def dispatch_bus_away(self, message: dict[str, Any]) -> None:
        """The layer went away under this page (``events.guarded``)."""
        self.bus_away = True
        if self._accepted:  # else connect() is yet to run, and will see it
            await self._pause()

    async def _pause(self) -> None:
        if not self._closed:
            self._closed = True
            await self.close(code=LIVE_PAUSED, reason="live updates paused: Redis is away")

    async def disconnect(self, code: int) -> None:
        if self.username:  # refused connections never joined
            await events.leave(self.channel_name, staff=self.staff, username=self.username)

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

    async def dispatch_event(self, message: dict[str, Any]) -> None:
        await self._send_event(message["event"])
