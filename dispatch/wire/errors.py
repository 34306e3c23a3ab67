"""hal0web's own errors (``ApiError``), and reading an upstream's error answer.

The body an error becomes is its protocol's (``dispatch.wire.protocols``). Pure: no Django.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping
from typing import Any

import orjson


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
        self.queued_s = 0.0  # how long the request had waited for its model by then


def invalid_request(
    message: str, param: str | None = None, code: str = "invalid_request_error"
) -> ApiError:
    """400 for a request body hal0web cannot read or serve (``param``: the field at fault)."""
    return ApiError(400, code, message, param=param)


def dumps(data: Any) -> bytes:
    """JSON bytes; a lone surrogate a client sent (and we accepted, see lib.json_reader) comes
    back as its escape instead of failing: orjson refuses to encode one."""
    try:
        return orjson.dumps(data)
    except TypeError:
        return json.dumps(data, separators=(",", ":")).encode()


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
