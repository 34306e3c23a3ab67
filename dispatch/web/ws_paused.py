"""A page's WebSocket while the database is away: paused, never a handshake 500.

Who a page's user is comes from the session, in the database (Channels' AuthMiddleware reads
it before the consumer runs). With the database away that read raised through the ASGI
server: a 500 to the handshake and a traceback per reconnecting page. This sits outside the
session middleware and answers such a connection as the consumer answers one while Redis is
away: accepted, then closed with ``LIVE_PAUSED``, which the page shows as "live updates
paused" and retries every second or two.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from dispatch.coordination import outages
from dispatch.web.consumers import LIVE_PAUSED

Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[Message]],
        Callable[[Message], Awaitable[None]],
    ],
    Awaitable[None],
]


class PausedWhileDatabaseAway:
    def __init__(self, inner: ASGIApp) -> None:
        self.inner = inner

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        accepted = connected = False

        async def receiving() -> Message:
            nonlocal connected
            message = await receive()
            connected = connected or message["type"] == "websocket.connect"
            return message

        async def sending(message: Message) -> None:
            nonlocal accepted
            accepted = accepted or message["type"] == "websocket.accept"
            await send(message)

        if outages.DATABASE.available():
            try:
                await self.inner(scope, receiving, sending)
                return
            except outages.DATABASE.errors as exc:
                if accepted:
                    raise  # the consumer's own business (it reads no database after accepting)
                outages.DATABASE.failed("reading a page's session", exc)  # warns once
        else:
            outages.DATABASE.missed()
        if not connected:
            await receive()  # the handshake's websocket.connect
        await send({"type": "websocket.accept"})
        await send(
            {
                "type": "websocket.close",
                "code": LIVE_PAUSED,
                "reason": "live updates paused: the database is away",
            }
        )
