"""The yardstick of issue 23: a minimal Python proxy, Starlette + aiohttp, 40 lines.

Everything a bare proxy does and nothing more: one route, the body and the headers forwarded
through one pooled aiohttp session, the answer relayed (a stream chunk by chunk as it comes).
No auth, no resolution, no log, no metrics. hal0web does all of those on top and is held to
this one's instructions and throughput (docs/performance.md). Served by the same Uvicorn
command line as hal0web: ``uvicorn bench.minimal:app`` with ``BENCH_UPSTREAM`` set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9")
_HOP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
_session: aiohttp.ClientSession | None = None


async def proxy(request: Request) -> Response:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    headers = {k: v for k, v in request.headers.items() if k not in _HOP}
    upstream = await _session.post(
        UPSTREAM + request.url.path, data=await request.body(), headers=headers
    )
    if upstream.content_type == "text/event-stream":

        async def relay() -> AsyncIterator[bytes]:
            async with upstream:
                async for chunk in upstream.content.iter_any():
                    yield chunk

        return StreamingResponse(relay(), upstream.status, media_type="text/event-stream")
    async with upstream:
        body = await upstream.read()
    return Response(body, upstream.status, media_type=upstream.content_type)


app = Starlette(routes=[Route("/v1/chat/completions", proxy, methods=["POST"])])
