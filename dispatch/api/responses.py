"""hal0web's own answers on the API: request ids, errors as responses, the routing headers."""

from __future__ import annotations

import itertools
import secrets
from http.cookies import SimpleCookie

from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.http.response import ResponseHeaders

from dispatch.conf import conf
from dispatch.coordination import outages
from dispatch.coordination.outages import Unavailable
from dispatch.observability.decisions import DecisionRecord
from dispatch.wire.errors import ApiError
from dispatch.wire.protocols import OPENAI, WireProtocol

# Request ids: a random prefix per process and a counter, 32 hex digits like a uuid4's. As
# unique as one for logs (workers and restarts draw their own prefix), for a fraction of
# uuid4's cost on every request.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def request_id(request: HttpRequest) -> str:
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_ids):016x}"


class Headers(ResponseHeaders):
    """Django's response headers, the common header stored at once: a str name and value,
    both ASCII and free of CR and LF, are what Django's checks (two per header: a charset
    probe, an encode, a search for line breaks) would store unchanged. Anything else takes
    Django's own way: a line break still raises ``BadHeaderError``, a value outside Latin-1
    is still MIME-encoded, bytes and ints still converted."""

    def __init__(self) -> None:  # (an answer's headers come one by one)
        self._store = {}

    def __setitem__(self, key: str, value: str | bytes | int) -> None:
        if (
            type(key) is str
            and type(value) is str
            and key.isascii()  # (O(1): CPython keeps it as a flag of the string)
            and value.isascii()
            and "\n" not in key
            and "\r" not in key
            and "\n" not in value
            and "\r" not in value
        ):
            self._store[key.lower()] = (key, value)
        else:
            super().__setitem__(key, value)


def start(response: HttpResponseBase, status: int, content_type: str | None) -> None:
    """What ``HttpResponseBase.__init__`` sets up, at a fraction of its cost on every /v1
    answer: its headers are ``Headers``, the default Content-Type is made without parsing
    the header back for its charset, and ``Content-Type`` is not looked for in an empty
    mapping by raising KeyError. tests/test_api_answer.py holds it to Django's, attribute by
    attribute (private ones among them: a Django that adds or renames one fails there)."""
    if not 100 <= status <= 599:
        raise ValueError("HTTP status code must be an integer from 100 to 599.")
    headers = Headers()
    headers["Content-Type"] = content_type or f"text/html; charset={conf.DEFAULT_CHARSET}"
    response.__dict__.update(
        headers=headers,
        _charset=None,
        _resource_closers=[],
        _handler_class=None,
        cookies=SimpleCookie(),
        closed=False,
        status_code=status,
        _reason_phrase=None,
    )


class Answer(HttpResponse):
    """A whole /v1 answer: an ``HttpResponse`` made for less (``start``). Its content is
    bytes, always (what the relay and the wire protocols make)."""

    def __init__(self, content: bytes, status: int = 200, content_type: str | None = None) -> None:
        start(self, status, content_type)
        self._container = [content]  # what HttpResponse's content setter keeps of bytes


def error_response(err: ApiError, protocol: WireProtocol = OPENAI) -> HttpResponse:
    """``err`` as the response a client of ``protocol`` parses."""
    response = Answer(
        protocol.error_body(err.status, err.code, err.message, err.param),
        err.status,
        "application/json",
    )
    for key, value in err.headers.items():
        response[key] = value
    # Made by hal0web, not by a model server: nobody should mistake one for the other.
    response["X-Hal0-Error"] = "1"
    return response


def unavailable(exc: Unavailable) -> ApiError:
    """503 for a request that needs a shared service that is away (Redis, the database):
    the code names what is missing, ``Retry-After`` when to ask again."""
    return ApiError(503, exc.code, exc.message, headers={"Retry-After": str(outages.RETRY_AFTER_S)})


def fail(
    request: HttpRequest,
    err: ApiError,
    allow: str | None = None,
    protocol: WireProtocol = OPENAI,
) -> HttpResponse:
    """An error answered before the request was routed (no decision to record)."""
    response = error_response(err, protocol)
    response["X-Request-Id"] = request_id(request)
    if allow:
        response["Allow"] = allow
    return response


def visible(response: HttpResponseBase, rec: DecisionRecord) -> None:
    """The headers that tell a client which request this was and where it went."""
    response["X-Request-Id"] = rec.request_id
    # How long it waited for its model to be loaded (0: it was loaded), on every answer.
    response["X-Hal0-Queued-Ms"] = str(round(rec.queued_ms))
    if rec.slot:
        response["X-Hal0-Slot"] = rec.slot
    if rec.resolution_path:
        response["X-Hal0-Resolution"] = rec.resolution_path
    if rec.mode:  # passthrough or translated (dispatch.wire.adapters)
        response["X-Hal0-Mode"] = rec.mode
