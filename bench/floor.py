"""The floor of the design, measured in the same run: bare Django async views, no middleware.

Two views under Django's stock ASGIHandler, served by Uvicorn (httptools, uvloop) like
hal0web: ``/const/v1/chat/completions`` returns a constant answer; ``/proxy/v1/...`` forwards
the body to the fake upstream through one pooled aiohttp session and returns its answer.
hal0web does real work on top of the second; the performance issue asks for >= 70 % of the
first. Run: ``uvicorn bench.floor:application --lifespan off`` with ``BENCH_UPSTREAM`` set.
"""

from __future__ import annotations

import os

import aiohttp
import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="bench-floor",
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    LOGGING_CONFIG=None,
)
django.setup()

from django.core.handlers.asgi import ASGIHandler  # noqa: E402
from django.http import HttpRequest, HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

from bench.fake import _COMPLETION  # noqa: E402

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9") + "/v1/chat/completions"
_session: aiohttp.ClientSession | None = None


async def const(request: HttpRequest) -> HttpResponse:
    return HttpResponse(_COMPLETION, content_type="application/json")


async def proxied(request: HttpRequest) -> HttpResponse:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    async with _session.post(
        UPSTREAM, data=request.body, headers={"content-type": "application/json"}
    ) as upstream:
        body = await upstream.read()
        return HttpResponse(body, status=upstream.status, content_type=upstream.content_type)


urlpatterns = [
    path("const/v1/chat/completions", const),
    path("proxy/v1/chat/completions", proxied),
]

application = ASGIHandler()
