"""hal0web's own answers on the API: request ids, errors as responses, the routing headers."""

from __future__ import annotations

import itertools
import secrets

from django.http import HttpRequest, HttpResponse, HttpResponseBase

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


def error_response(err: ApiError, protocol: WireProtocol = OPENAI) -> HttpResponse:
    """``err`` as the response a client of ``protocol`` parses."""
    response = HttpResponse(
        protocol.error_body(err.status, err.code, err.message, err.param),
        status=err.status,
        content_type="application/json",
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
