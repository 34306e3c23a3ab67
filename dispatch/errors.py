"""Errors in the shape the official ``openai`` SDK parses: {"error": {message, type, param, code}}."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import orjson
from django.http import HttpResponse

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


def error_body(status: int, code: str, message: str, param: str | None = None) -> bytes:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


def error_response(err: ApiError) -> HttpResponse:
    response = HttpResponse(
        error_body(err.status, err.code, err.message, err.param),
        status=err.status,
        content_type="application/json",
    )
    for key, value in err.headers.items():
        response[key] = value
    return response


def sse_error(code: str, message: str) -> bytes:
    """The last event of a stream that failed after its first byte."""
    return b"data: " + error_body(502, code, message) + b"\n\n"
