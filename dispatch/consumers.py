"""The live UI's WebSocket: a snapshot on connect, then every dispatch event as it happens."""

from __future__ import annotations

from typing import Any

import orjson
from channels.generic.websocket import AsyncWebsocketConsumer

from dispatch import events
from dispatch.admission import admission
from dispatch.outliers import outliers
from dispatch.snapshots import snapshot
from dispatch.store import store


class DispatchConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        # Join first, then read the table: a change in between arrives as a delta after the
        # snapshot instead of being lost.
        await events.join(self.channel_name)
        await self.accept()
        table = await store.ensure_loaded()
        await self.send(
            text_data=orjson.dumps(
                snapshot(table, admission.inflight, store.freshness(), outliers.overlay())
            ).decode()
        )

    async def disconnect(self, code: int) -> None:
        await events.leave(self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # The page may ask for a fresh snapshot (for current in-flight counts, say). Anything
        # else, malformed JSON included, is ignored: a client's noise must not close the socket.
        try:
            message = orjson.loads(text_data or bytes_data or b"")
        except orjson.JSONDecodeError:
            return
        if isinstance(message, dict) and message.get("type") == "snapshot":
            table = await store.ensure_loaded()
            await self.send(
                text_data=orjson.dumps(
                    snapshot(table, admission.inflight, store.freshness(), outliers.overlay())
                ).decode()
            )

    async def dispatch_event(self, message: dict[str, Any]) -> None:
        await self.send(text_data=orjson.dumps(message["event"]).decode())
