"""CORS for /v1: which browser origins may call the API, and the headers that say so. Pure.

Only the origins named in HAL0_CORS_ORIGINS are allowed (none by default: the API is for
local tools and the page, which is same-origin). Credentials (cookies) are never allowed
cross-origin: a browser app calls with an API key in ``Authorization``, as the OpenAI SDKs
do, so a foreign page cannot ride on a logged-in user's session.
"""

from __future__ import annotations

from collections.abc import Set

# Response headers a browser script may read: the SDKs read x-request-id and retry-after;
# the rest say where a request went and who made an error.
EXPOSED = ", ".join(
    (
        "Retry-After",
        "X-Request-Id",
        "X-Hal0-Slot",
        "X-Hal0-Resolution",
        "X-Hal0-Queued-Ms",
        "X-Hal0-Error",
        "X-Hal0-Upstream-Status",
    )
)
# How long a browser may cache a preflight answer (seconds).
MAX_AGE_S = 600


def allowed(origin: str | None, origins: Set[str]) -> bool:
    """Whether ``origin`` (the request's Origin header) is one of ``origins`` (lowercase,
    as settings keeps them): scheme and host compare case-insensitively."""
    return bool(origin) and origin is not None and origin.lower() in origins


def same_origin(origin: str, scheme: str | None, host: str) -> bool:
    """Whether ``origin`` is the API's own (scheme, host and port): the page's calls."""
    return origin.lower() == f"{scheme}://{host}".lower()


def preflight(
    origin: str | None, origins: Set[str], allow: str, request_headers: str | None
) -> dict[str, str]:
    """The CORS headers of a preflight (OPTIONS) answer; empty for an origin not allowed,
    which the browser then refuses on its own."""
    if not allowed(origin, origins):
        return {}
    assert origin is not None
    headers = {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": allow,
        "Access-Control-Max-Age": str(MAX_AGE_S),
    }
    if request_headers:
        # Whatever the client wants to send (the SDKs add a dozen x-stainless-* headers):
        # the origin is trusted, and credentials are not allowed anyway.
        headers["Access-Control-Allow-Headers"] = request_headers
    return headers


def actual(origin: str | None, origins: Set[str]) -> dict[str, str]:
    """The CORS headers of an actual (non-preflight) answer."""
    if not allowed(origin, origins):
        return {}
    assert origin is not None
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Expose-Headers": EXPOSED}
