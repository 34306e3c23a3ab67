"""The floor under issue 23's yardstick: bench/minimal.py without Starlette.

The same forwarding through one pooled aiohttp session, written as a raw ASGI app: what
Uvicorn and aiohttp cost by themselves, which any Python proxy served by Uvicorn and
forwarding with aiohttp pays before it does anything of its own. bench/served.py measures
it beside the minimal proxy, so the room the yardstick leaves above the floor (Starlette's
share, which hal0web's Django, auth, routing and records would have to fit in) is a figure
of the same run. Served as ``uvicorn bench.bare_proxy:app`` with ``BENCH_UPSTREAM`` set.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9")
_HOP = {b"host", b"content-length", b"connection", b"transfer-encoding", b"keep-alive"}
_session: aiohttp.ClientSession | None = None

Message = MutableMapping[str, Any]


async def app(
    scope: Message,
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    global _session
    if scope["type"] != "http":  # lifespan: nothing to start
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] != "POST" or scope["path"] != "/v1/chat/completions":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body"})
        return
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    headers = {
        k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k not in _HOP
    }
    async with _session.post(UPSTREAM + scope["path"], data=b"".join(parts), headers=headers) as up:
        kind = up.content_type.encode("latin-1")
        if kind == b"text/event-stream":
            await send({"type": "http.response.start", "status": up.status, "headers": [(b"content-type", kind)]})  # fmt: skip
            async for chunk in up.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body"})
            return
        body = await up.read()
    length = str(len(body)).encode()
    await send({"type": "http.response.start", "status": up.status, "headers": [(b"content-type", kind), (b"content-length", length)]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
