"""The proxied API views: read the body, authorize, find the model, decide, forward, relay.

Served by a middleware-free handler (see ``hal0web/asgi.py``): all async, no thread hops.
"""

from __future__ import annotations

import asyncio

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase

from dispatch.api import bodies, relay
from dispatch.api.decide import decide
from dispatch.api.guard import View, serves
from dispatch.api.keys import authorize
from dispatch.api.responses import error_response, request_id, visible
from dispatch.coordination.store import store
from dispatch.lifecycle.watcher import suspect
from dispatch.observability.decisions import DecisionRecord, record
from dispatch.routing.endpoints import Endpoint
from dispatch.upstream.admission import admission
from dispatch.upstream.forward import Forwarded, forward
from dispatch.wire.adapters import ClientRequest
from dispatch.wire.errors import ApiError
from dispatch.wire.protocols import streamed_as


def _read_body(request: HttpRequest) -> bytes:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    length = request.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise _too_big()
    try:
        return request.body
    except RequestDataTooBig:
        raise _too_big() from None


def _too_big() -> ApiError:
    return ApiError(
        413,
        "request_too_large",
        f"The request body is larger than HAL0_MAX_BODY_MB ({settings.HAL0_MAX_BODY_MB:g} MB).",
    )


def _forward_headers(request: HttpRequest, rid: str) -> dict[str, str]:
    """The client's headers as text. The server hands them over decoded as latin-1 (what
    HTTP/1.1 allows on the wire); a value that is UTF-8 on the wire (``X-Title: café``) goes
    upstream as the same bytes. Any other byte sequence is not text either end can agree
    on: 400, not a guess."""
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        if not value.isascii():
            try:
                value = value.encode("latin-1").decode("utf-8")
            except UnicodeError:
                raise ApiError(
                    400,
                    "invalid_header",
                    f"The {name!r} header is not UTF-8 text; send it as UTF-8 or ASCII.",
                ) from None
        headers[name] = value
    headers["X-Request-Id"] = rid
    return headers


class _Body:
    """The request body as far as routing needs it: the model it names, and the bytes to
    send each target (only ``model`` rewritten, never re-encoded)."""

    def __init__(self, ep: Endpoint, request: HttpRequest, raw: bytes) -> None:
        self.raw = raw
        self.model: str | None = None
        self.previous: str | None = None  # a Responses request's previous_response_id
        self._json: bodies.ParsedBody | None = None
        self._form: bodies.FormBody | None = None
        if ep.model_in == "json":
            self._json = bodies.parse(raw)
            self.model = self._json.model
            if ep.records_response:
                previous = self._json.data.get("previous_response_id")
                self.previous = previous if isinstance(previous, str) and previous else None
        elif ep.model_in == "form":
            self._form = bodies.parse_form(raw, request.headers.get("Content-Type", ""))
            self.model = self._form.model

    def for_model(self, upstream_model: str | None) -> bytes:
        if upstream_model is None:
            return self.raw
        if self._json is not None:
            return bodies.with_model(self._json, upstream_model)
        if self._form is not None:
            return bodies.with_form_model(self._form, upstream_model)
        return self.raw


async def _forwarded(
    ep: Endpoint, request: HttpRequest, rec: DecisionRecord, response_id: str | None
) -> Forwarded:
    """The open upstream response for the request; ApiError when hal0web answers itself."""
    caller = await authorize(request, ep.key_header)
    rec.client = caller.client
    raw = _read_body(request) if request.method == "POST" else b""
    if settings.HAL0_LOG_BODIES:
        rec.body = raw[: settings.HAL0_LOG_BODY_MAX_BYTES]
    body = _Body(ep, request, raw)
    rec.model = body.model
    table = await store.ensure_loaded()
    rid = response_id or body.previous
    decision = await decide(table, body.model, ep.offer, rec, caller.scope, rid)
    rec.forwarding()
    return await forward(
        decision,
        ep.offer,
        ClientRequest(request.path, request.META.get("QUERY_STRING", ""), body),
        _forward_headers(request, rec.request_id),
        suspect,
        method=request.method or "POST",
    )


def proxy_view(ep: Endpoint) -> View:
    async def view(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
        rec = DecisionRecord.arrived(request_id(request), ep.name)
        try:
            fwd = await _forwarded(ep, request, rec, kwargs.get("response_id"))
        except ApiError as err:
            response = error_response(err, ep.protocol)
            rec.failed(err.status, err.code)
            visible(response, rec)
            rec.ended(by_us=True)
            record(rec)
            return response
        except asyncio.CancelledError:
            # The client went away before the upstream answered. 499 is nginx's "client
            # closed request": the log line still says where the request was going.
            rec.failed(499, "client_disconnected")
            rec.ended()
            record(rec)
            raise
        status = fwd.response.status_code
        rec.answered(fwd.slot.name, fwd.upstream_model, fwd.resolution_path, status)
        rec.inflight = admission.inflight.get(fwd.slot.name, 0)
        if status >= 400:
            return await relay.upstream_failed(fwd, rec, ep.protocol)
        stream = streamed_as(ep.protocol, fwd.response.content_type)
        if stream is not None:
            return relay.streaming(fwd, rec, stream, ep.records_response)
        if ep.answer == "bytes":
            return relay.passthrough(fwd, rec)
        return await relay.buffered(fwd, rec, ep.protocol, ep.records_response)

    view.__name__ = f"v1_{ep.name.replace('/', '_').replace('{', '').replace('}', '')}"
    return serves(ep.methods, view, ep.label, ep.protocol)
