"""hal0web under Uvicorn (uvloop, httptools) with a chosen transport behind the proxy seam.

Used by ``python -m bench transports`` to compare transports in one run, each in its own
process: httpx's own pool, the httpx-aiohttp package's transport, and dispatch.upstream.pool's
AiohttpTransport. Run: ``python -m bench.serve {httpx|httpx-aiohttp|aiohttp|default} PORT``.
"""

from __future__ import annotations

import os
import sys

import httpx
import uvicorn

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")

from dispatch.upstream.client import upstream
from dispatch.upstream.pool import AiohttpTransport
from hal0web.asgi import application

LIMITS = httpx.Limits(max_connections=10_000, max_keepalive_connections=1000)


def transport(name: str) -> httpx.AsyncBaseTransport | None:
    if name == "httpx":
        return httpx.AsyncHTTPTransport(limits=LIMITS)
    if name == "httpx-aiohttp":
        import httpx_aiohttp

        return httpx_aiohttp.AiohttpTransport(limits=LIMITS, trust_env=False)
    if name == "aiohttp":
        return AiohttpTransport()
    if name == "default":
        return None
    raise SystemExit(f"unknown transport {name!r}")


def without_thread_hops() -> None:
    """What-if for the lead: Django's ASGIHandler minus its per-request thread work.

    Stock ``ASGIHandler.__call__`` opens a ThreadSensitiveContext (a new executor thread per
    request), ``request_started``/``request_finished`` run their sync receivers
    (close_old_connections, reset_queries) through sync_to_async, and ``response.close()`` is
    called through sync_to_async: two or three thread hops per request on a path that never
    touches the ORM. This patches them out in this process only, to measure what they cost.
    Since commit 84ad057 the /v1 handler does this itself, so ``+bare`` now shows only what
    is left (the signal receivers, for the rest of the site).
    """
    from django.core import signals
    from django.core.handlers import asgi as dj_asgi
    from django.db import close_old_connections, reset_queries

    from dispatch.api.runtime import BareASGIHandler

    signals.request_started.disconnect(reset_queries)
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    real = dj_asgi.sync_to_async  # type: ignore[attr-defined]

    def direct_close(func, *args, **kwargs):
        if getattr(func, "__name__", "") == "close":

            async def call(*a, **kw):
                return func(*a, **kw)

            return call
        return real(func, *args, **kwargs)

    dj_asgi.sync_to_async = direct_close  # type: ignore[attr-defined]

    async def call(self, scope, receive, send):
        await self.handle(scope, receive, send)

    BareASGIHandler.__call__ = call  # type: ignore[method-assign]


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    if name.endswith("+bare"):
        name = name.removesuffix("+bare")
        without_thread_hops()
    upstream.use_transport(transport(name))
    uvicorn.run(
        application,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
