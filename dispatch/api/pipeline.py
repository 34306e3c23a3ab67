"""The proxied API views: read the body, authorize, find the model, decide, forward, relay.

Served by a middleware-free handler (see ``hal0web/asgi.py``): all async, no thread hops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponseBase

from dispatch.api import bodies, ollama_loads, ollama_models, relay, stored_responses
from dispatch.api.decide import decide
from dispatch.api.drain import drain
from dispatch.api.guard import View, serves
from dispatch.api.keys import authorize
from dispatch.api.request import query_string
from dispatch.api.responses import error_response, request_id, unavailable, visible
from dispatch.conf import conf
from dispatch.coordination.outages import Unavailable
from dispatch.coordination.store import store
from dispatch.lifecycle.watcher import suspect
from dispatch.observability.decisions import DecisionRecord, record
from dispatch.routing import eviction, states
from dispatch.routing.endpoints import Endpoint
from dispatch.routing.resolver import Decision, Target
from dispatch.upstream.admission import admission
from dispatch.upstream.forward import Forwarded, forward
from dispatch.upstream.loads import Waiting
from dispatch.wire.adapters import ClientRequest
from dispatch.wire.errors import ApiError, dumps
from dispatch.wire.framing import SSE
from dispatch.wire.protocols import OLLAMA, streamed_as
from dispatch.wire.translators.responses_chat import CONVERSATION, input_items


def _read_body(request: HttpRequest) -> bytes:
    limit = conf.DATA_UPLOAD_MAX_MEMORY_SIZE
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
        f"The request body is larger than HAL0_MAX_BODY_MB ({conf.HAL0_MAX_BODY_MB:g} MB).",
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
        self.streams = False  # it asks for a stream ("stream": true)
        self.previous: str | None = None  # a Responses request's previous_response_id
        self._json: bodies.ParsedBody | None = None
        self._form: bodies.FormBody | None = None
        self._asked: dict[str, Any] | None = None  # the body as sent, when sent otherwise
        if ep.model_in == "json":
            self._json = bodies.parse(raw)
            self.model = self._json.model
            self.streams = self._json.data.get("stream") is True
            if ep.records_response:
                previous = self._json.data.get("previous_response_id")
                self.previous = previous if isinstance(previous, str) and previous else None
        elif ep.model_in == "form":
            self._form = bodies.parse_form(raw, request.headers.get("Content-Type", ""))
            self.model = self._form.model

    def json(self) -> dict[str, Any] | None:
        if self._asked is not None:
            return self._asked
        return None if self._json is None else self._json.data

    def follow(self, conversation: list[dict[str, Any]]) -> None:
        """A ``previous_response_id`` hal0web keeps: a slot sent the request as it came has
        never seen that id, so what it is sent carries the conversation in ``input`` instead
        (a translating adapter reads the body as sent and the conversation from the context)."""
        assert self._json is not None
        asked = self._json.data
        sent = {k: v for k, v in asked.items() if k != "previous_response_id"}
        sent["input"] = [*conversation, *input_items(asked.get("input"))]
        self._json = bodies.parse(dumps(sent))
        self.raw, self._asked = self._json.raw, asked

    def for_model(self, upstream_model: str | None) -> bytes:
        if upstream_model is None:
            return self.raw
        if self._json is not None:
            return bodies.with_model(self._json, upstream_model)
        if self._form is not None:
            return bodies.with_form_model(self._form, upstream_model)
        return self.raw


class _Call:
    """A request decided and ready to forward: forwarding may start as a task when it is a
    stream that may wait for its model (see ``waits``)."""

    def __init__(self, ep: Endpoint, decision: Decision, client: ClientRequest, headers: dict[str, str], method: str, streams: bool) -> None:  # fmt: skip
        self.ep, self.decision, self.client = ep, decision, client
        self.headers, self.method = headers, method
        # An SSE stream to a slot that loads models on request: a wait for its model may
        # start the stream early, to say how the wait goes (relay.waiting_stream).
        self.may_wait = (
            streams and ep.protocol.framing is SSE and any(map(_unloaded, decision.targets))
        )

    def forward(self, on_wait: Callable[[Waiting], None] | None = None) -> Awaitable[Forwarded]:
        return forward(
            self.decision, self.ep.offer, self.client, self.headers, suspect, self.method, on_wait
        )


def _unloaded(target: Target) -> bool:
    """Whether the target's model may have to be loaded first (its slot loads models, and
    the model is not loaded as the table has it now)."""
    if not target.slot.loads_models:
        return False
    model = eviction.served(target.slot).get(target.upstream_model or "")
    return model is not None and model.load not in states.SERVABLE


async def _decided(
    ep: Endpoint, request: HttpRequest, rec: DecisionRecord, response_id: str | None
) -> _Call | HttpResponseBase:
    """The request authorized, read and decided; ApiError when hal0web answers itself, or
    its answer when it is about a response hal0web keeps (``api.stored_responses``)."""
    caller = await authorize(request, ep.key_header)
    rec.client = caller.client
    if response_id is not None and stored_responses.is_ours(response_id):
        answered = await stored_responses.answer(ep, request, response_id, caller.scope, rec)
        if answered is not None:
            return answered
    raw = _read_body(request) if request.method == "POST" else b""
    if conf.HAL0_LOG_BODIES:
        rec.body = raw[: conf.HAL0_LOG_BODY_MAX_BYTES]
    body = _Body(ep, request, raw)
    rec.model = body.model
    table = await store.ensure_loaded()
    rid = response_id or body.previous
    model = body.model
    if ep.protocol is OLLAMA:  # its names carry tags: gemma3:latest is gemma3
        model = ollama_models.known_name(table, model)
    context: dict[str, Any] = {}
    if body.previous is not None and stored_responses.is_ours(body.previous):
        # A response hal0web keeps: the request goes where its model does, after the
        # conversation the id stands for.
        conversation = await stored_responses.conversation(body.previous, caller.scope, rec)
        if conversation is not None:
            body.follow(conversation)
            context[CONVERSATION], rid = conversation, response_id
    decision = await decide(table, model, ep.offer, rec, caller.scope, rid)
    rec.forwarding()
    return _Call(
        ep,
        decision,
        ClientRequest(request.path, query_string(request), body, context),
        _forward_headers(request, rec.request_id),
        request.method or "POST",
        body.streams,
    )


# A stream that has waited this long for its model, and still waits, starts now (with SSE
# comments saying how the wait goes); one served sooner never sees a comment.
EARLY_AFTER_S = 1.0


async def _forward_or_start(call: _Call, rec: DecisionRecord) -> Forwarded | HttpResponseBase:
    """Forward; a stream that waits for its model for long is answered at once instead
    (relay.waiting_stream), its forwarding going on in a task the stream follows."""
    waits: list[Waiting] = []
    forwarding = asyncio.ensure_future(call.forward(waits.append))
    try:
        while True:
            await asyncio.wait((forwarding,), timeout=EARLY_AFTER_S)
            if forwarding.done():
                return forwarding.result()
            if waits:
                break
    except BaseException:
        forwarding.cancel()
        raise
    rec.slot = waits[-1].slot
    rec.queued_ms = waits[-1].waited_s * 1000
    return relay.waiting_stream(
        forwarding,
        lambda: waits[-1] if waits else None,
        rec,
        call.ep.protocol,
        call.ep.records_response,
    )


def _ours(rec: DecisionRecord, err: ApiError, ep: Endpoint) -> HttpResponseBase:
    """hal0web's own error answer, recorded."""
    response = error_response(err, ep.protocol)
    rec.failed(err.status, err.code)
    rec.queued_ms = err.queued_s * 1000
    visible(response, rec)
    rec.ended(by_us=True)
    record(rec)
    return response


async def _relayed(ep: Endpoint, fwd: Forwarded, rec: DecisionRecord) -> HttpResponseBase:
    """The upstream's answer, relayed as what it is: an error, a stream, bytes or JSON."""
    try:
        if fwd.response.status_code >= 400:
            return await relay.upstream_failed(fwd, rec, ep.protocol)
        stream = streamed_as(ep.protocol, fwd.response.content_type)
        if stream is not None:
            if fwd.translation is not None:  # re-framed event by event, in the client's protocol
                return relay.streaming(fwd, rec, ep.protocol, ep.records_response)
            return relay.streaming(fwd, rec, stream, ep.records_response)
        if ep.answer == "bytes":
            return relay.passthrough(fwd, rec)
        return await relay.buffered(fwd, rec, ep.protocol, ep.records_response)
    except asyncio.CancelledError:
        if not drain.taken():
            raise
        # A whole answer still being read when the drain ran out (a stream's own ending is
        # the relay's): nothing of it has gone out, and nothing was recorded.
        return _ours(rec, drain.refusal(), ep)


def proxy_view(ep: Endpoint) -> View:
    async def view(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
        rec = DecisionRecord.arrived(request_id(request), ep.name)
        if drain.stopping:  # this process is stopping: a request that came now goes elsewhere
            return _ours(rec, drain.refusal(), ep)
        drain.track()
        try:
            call = await _decided(ep, request, rec, kwargs.get("response_id"))
            if not isinstance(call, _Call):  # answered by hal0web from its store
                return call
            if ep.protocol is OLLAMA:  # a request that only loads or unloads its model
                own = await ollama_loads.answered(ep, call.decision, call.client, rec)
                if own is not None:
                    return own
            if call.may_wait:
                outcome = await _forward_or_start(call, rec)
                if not isinstance(outcome, Forwarded):
                    return outcome
                fwd = outcome
            else:
                fwd = await call.forward()
        except (ApiError, Unavailable) as exc:
            return _ours(rec, exc if isinstance(exc, ApiError) else unavailable(exc), ep)
        except asyncio.CancelledError:
            if drain.taken():  # still waiting when the server's drain ran out
                return _ours(rec, drain.refusal(), ep)
            # The client went away before the upstream answered. 499 is nginx's "client
            # closed request": the log line still says where the request was going.
            rec.failed(499, "client_disconnected")
            rec.ended()
            record(rec)
            raise
        status = fwd.response.status_code
        rec.answered(fwd.slot.name, fwd.upstream_model, fwd.resolution_path, status, fwd.mode)
        rec.queued_ms = fwd.queued_s * 1000
        rec.inflight = admission.inflight.get(fwd.slot.name, 0)
        return await _relayed(ep, fwd, rec)

    view.__name__ = f"v1_{ep.name.replace('/', '_').replace('{', '').replace('}', '')}"
    return serves(ep.methods, view, ep.label, ep.protocol)
