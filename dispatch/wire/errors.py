"""Errors in the shape the client of a path parses: the ``openai`` SDK's
{"error": {message, type, param, code}}, or on the Anthropic Messages paths the
``anthropic`` SDK's {"type": "error", "error": {type, message}} (the endpoint table says
which path takes which: ``dispatch.routing.endpoints``)."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any

import orjson
from django.http import HttpResponse

from dispatch.lib import redact

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """Raised anywhere below a /v1 view; the view turns it into a response."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})


def dumps(data: Any) -> bytes:
    """JSON bytes; a lone surrogate a client sent (and we accepted, see bodies.loads) comes
    back as its escape instead of failing: orjson refuses to encode one."""
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data, separators=(",", ":")).encode()


# Anthropic's error types by status (its API reference, "Errors"); a 5xx of a gateway is its
# api_error, a 503 its overloaded_error (what the SDK retries and reports as such).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def error_body(
    status: int, code: str, message: str, param: str | None = None, shape: str = "openai"
) -> bytes:
    if shape == "anthropic":
        kind = _ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        # hal0web's own code rides along in the error object (the SDK keeps the body).
        return dumps({"type": "error", "error": {"type": kind, "message": message, "code": code}})
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    # Whatever an error quotes (a slot's URL, an upstream's words), no credential in a URL
    # reaches the client.
    message = redact.masked(message)
    return dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(err: ApiError, shape: str = "openai") -> HttpResponse:
    response = HttpResponse(
        error_body(err.status, err.code, err.message, err.param, shape),
        status=err.status,
        content_type="application/json",
    )
    for key, value in err.headers.items():
        response[key] = value
    # Made by hal0web, not by a model server: nobody should mistake one for the other.
    response["X-Hal0-Error"] = "1"
    return response


# --- an upstream's error answer, seen by an OpenAI client -------------------------------------

# An upstream status kept as it is: the request's own fault (its size, its content, its rate)
# or the upstream saying "later" / "too slow". Anything else becomes 502: a 500 is the
# gateway's problem to the client, and a 401/403/407 is about the slot's credentials
# (api_key_env), which the client's own key cannot fix.
_NOT_KEPT_4XX = frozenset({401, 403, 407})
_KEPT_5XX = frozenset({503, 504})
EXCERPT_CHARS = 200
_DROP_BLOCKS = re.compile(r"<(script|style|head)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_TITLE = re.compile(r"<title\b[^>]*>(.*?)</title\s*>", re.I | re.S)
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


def upstream_error_status(upstream_status: int) -> int:
    """The status a client gets for an upstream error answer hal0web wraps."""
    if 400 <= upstream_status < 500 and upstream_status not in _NOT_KEPT_4XX:
        return upstream_status
    if upstream_status in _KEPT_5XX:
        return upstream_status
    return 502


def is_openai_error(data: Any) -> bool:
    """Already the shape the SDKs parse: {"error": {"message": "...", ...}} (Anthropic's
    {"type": "error", "error": {...}} has it too)."""
    error = data.get("error") if isinstance(data, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str)


def excerpt(body: bytes, limit: int = EXCERPT_CHARS) -> str:
    """A short, readable, single-line excerpt of an upstream's body: an HTML page's title
    and text without markup, scripts or styles; control characters dropped."""
    text = body[: 64 * 1024].decode("utf-8", "replace")
    if "<" in text:
        title = _TITLE.search(text)
        text = _DROP_BLOCKS.sub(" ", text)
        text = (title.group(1) + " " if title else "") + _TAG.sub(" ", text)
        text = html.unescape(text)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# The ends of what was sent that leave an SSE parser between events (a blank line, in any of
# the three line-ending styles the format allows).
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n", b"\n\r")


def sse_between_events(tail: bytes) -> bool:
    """Whether a stream whose last bytes are ``tail`` (up to 4) ends between two events."""
    return not tail or tail.endswith(_EVENT_ENDS)


def sse_error(code: str, message: str, tail: bytes = b"", shape: str = "openai") -> bytes:
    """The last event of a stream that failed after its first byte.

    ``tail`` is the end of what was already sent: if an event was cut there, a blank line
    ends it first, so the error is one complete event a client's parser can read, not glued
    onto half an event (which the client would see as one invalid JSON, losing both).
    Anthropic's streams name their events: its error event is ``event: error``.
    """
    close = b"" if sse_between_events(tail) else b"\n\n"
    name = b"event: error\n" if shape == "anthropic" else b""
    return close + name + b"data: " + error_body(502, code, message, shape=shape) + b"\n\n"
