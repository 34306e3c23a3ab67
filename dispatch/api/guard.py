"""What stands around every API view: the Host/Origin refusal, OPTIONS, 405 and CORS."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Set
from typing import Any

from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.utils.cache import patch_vary_headers

from dispatch.api import cors
from dispatch.api.responses import fail, unavailable
from dispatch.conf import conf
from dispatch.coordination.outages import Unavailable
from dispatch.routing.endpoints import SERVED_TEXT
from dispatch.wire.errors import ApiError, excerpt
from dispatch.wire.protocols import OPENAI, WireProtocol

View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


def serves(
    methods: tuple[str, ...], view: View, label: str, protocol: WireProtocol = OPENAI
) -> View:
    """``view`` answering only ``methods``, with OPTIONS (and CORS) handled around it.

    OPTIONS answers 204 with ``Allow`` (RFC 9110), plus a CORS preflight answer when the
    Origin is one of HAL0_CORS_ORIGINS; any other method not served is 405 with the same
    ``Allow``. Every answer to an allowed origin carries its CORS headers.
    """
    served = frozenset(methods) | {"OPTIONS"}
    allow = ", ".join(sorted(served))

    async def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        origins = conf.HAL0_CORS_ORIGINS
        origin = request.headers.get("Origin")
        response: HttpResponseBase
        refusal = refused(request, origin, origins)
        if refusal is not None:
            return fail(request, refusal, protocol=protocol)
        if request.method == "OPTIONS":
            response = HttpResponse(status=204)
            response["Allow"] = allow
            cors_headers = cors.preflight(
                origin, origins, allow, request.headers.get("Access-Control-Request-Headers")
            )
        else:
            if request.method in served:
                try:
                    response = await view(request, *args, **kwargs)
                except Unavailable as exc:  # what the view needs is away (the database, Redis)
                    response = fail(request, unavailable(exc), protocol=protocol)
            else:
                verbs = " or ".join(m for m in methods if m != "HEAD")
                response = fail(
                    request,
                    ApiError(405, "method_not_allowed", f"Use {verbs} for {label}."),
                    allow,
                    protocol,
                )
            cors_headers = cors.actual(origin, origins)
        for key, value in cors_headers.items():
            response[key] = value
        if origins:
            # The answer depends on the Origin: a cache must not serve one origin's to another.
            patch_vary_headers(response, ("Origin",))
        return response

    wrapped.__name__ = getattr(view, "__name__", "v1_view")
    return wrapped


def refused(request: HttpRequest, origin: str | None, origins: Set[str]) -> ApiError | None:
    """Why a request must not reach /v1 at all, from where it comes; None when it may.

    The host must be one of ALLOWED_HOSTS (as for the page and the admin): otherwise any
    web page could reach an install without keys by DNS rebinding. A browser names the page
    that sends a request in ``Origin`` (non-browser clients send none): only the page's own
    origin and HAL0_CORS_ORIGINS may call, so a foreign page cannot even send blind
    cross-origin POSTs (a ``text/plain`` form post needs no preflight). A preflight from a
    foreign origin still gets its plain answer, without CORS headers: the browser refuses.
    """
    try:
        host = request.get_host()
    except DisallowedHost:
        given = excerpt(request.headers.get("Host", "").encode("latin-1", "replace"), 80)
        return ApiError(
            400,
            "invalid_host",
            f"hal0web does not answer to the host {given!r}; add it to ALLOWED_HOSTS.",
        )
    if origin is None or request.method == "OPTIONS" or cors.allowed(origin, origins):
        return None
    if cors.same_origin(origin, request.scheme, host):
        return None
    return ApiError(
        403,
        "origin_not_allowed",
        f"Requests from the web page at {excerpt(origin.encode('latin-1', 'replace'), 80)!r}"
        " may not call this API; add its origin to HAL0_CORS_ORIGINS to allow it.",
    )


async def not_found(
    request: HttpRequest, path: str, protocol: WireProtocol = OPENAI
) -> HttpResponse:
    """Any path under an API prefix (/v1/, Ollama's /api/) the endpoint table does not hold:
    404 in the protocol of the prefix's clients, listing the paths it does hold."""
    origin, origins = request.headers.get("Origin"), conf.HAL0_CORS_ORIGINS
    refusal = refused(request, origin, origins)
    if refusal is not None:
        return fail(request, refusal, protocol=protocol)
    response = fail(
        request,
        ApiError(404, "not_found", f"Unknown endpoint {request.path}. {SERVED_TEXT}."),
        protocol=protocol,
    )
    # A browser app can read the 404 too.
    for key, value in cors.actual(origin, origins).items():
        response[key] = value
    return response
