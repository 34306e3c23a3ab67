"""The OpenAI-compatible ``/v1`` views. They load, call and return; the work is elsewhere.

Served by a middleware-free handler (see ``hal0web/asgi.py``): all async, no thread hops.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Set
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import DisallowedHost, RequestDataTooBig
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.utils.cache import patch_vary_headers

from dispatch.api import bodies, cors
from dispatch.api.keys import authorize
from dispatch.coordination.affinity import StreamSniffer, affinity, response_id
from dispatch.coordination.store import store
from dispatch.lifecycle import health
from dispatch.observability.decisions import DecisionRecord, record
from dispatch.routing import states
from dispatch.routing.endpoints import BY_NAME, ENDPOINTS, SERVED_TEXT, Endpoint, upstream_path
from dispatch.routing.resolver import Decision, NoRoute, Target, candidates, pinned, resolve
from dispatch.routing.scopes import EVERYTHING, Scope, model_names
from dispatch.routing.table import RoutingTable
from dispatch.upstream.admission import admission
from dispatch.upstream.forward import Forwarded, forward
from dispatch.upstream.outliers import outliers
from dispatch.upstream.proxy import UpstreamError
from dispatch.wire.errors import (
    ApiError,
    error_response,
    excerpt,
    is_openai_error,
    sse_between_events,
    sse_error,
    upstream_error_status,
)

View = Callable[[HttpRequest], Coroutine[Any, Any, HttpResponseBase]]


# Request ids: a random prefix per process and a counter, 32 hex digits like a uuid4's. As
# unique as one for logs (workers and restarts draw their own prefix), for a fraction of
# uuid4's cost on every request.
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def _request_id(request: HttpRequest) -> str:
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return f"{_ID_PREFIX}{next(_ids):016x}"


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


def _visibility(
    response: HttpResponseBase, request_id: str, slot: str | None, path: str | None
) -> None:
    response["X-Request-Id"] = request_id
    if slot:
        response["X-Hal0-Slot"] = slot
    if path:
        response["X-Hal0-Resolution"] = path


def _forward_headers(request: HttpRequest, request_id: str) -> dict[str, str]:
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
    headers["X-Request-Id"] = request_id
    return headers


def _decided(
    result: Decision | NoRoute, rec: DecisionRecord, scope: Scope, model: str | None
) -> Decision:
    """Note what was decided in the record; a NoRoute is the client's error, and so is a
    decision none of whose slots the caller's key may use for ``model``."""
    rec.latency_us = result.latency_us
    if isinstance(result, Decision) and not scope.everything:
        narrowed = scope.narrow(result)
        if narrowed is None:
            rec.decision = result
            raise _not_allowed(rec, scope, model)
        result = narrowed
    rec.decision = result
    if isinstance(result, NoRoute):
        rec.slot = result.slot
        param = "model" if result.code != "response_not_found" else None
        raise ApiError(result.status, result.code, result.message, param=param)
    rec.slot, rec.upstream_model = result.slot, result.upstream_model
    rec.resolution_path = result.resolution_path
    # The counts the ranking saw, kept for the explanation (they move on at once).
    inflight = admission.inflight
    rec.seen_inflight = tuple(inflight.get(t.slot.name, 0) for t in result.targets)
    return result


async def _resolve(
    table: RoutingTable, model: str | None, endpoint: str, rec: DecisionRecord, scope: Scope
) -> Decision:
    fallback = settings.HAL0_FALLBACK_SLOT
    result = resolve(table, model, endpoint, admission.inflight, fallback)
    rec.cache_state = "stale" if store.stale else "fresh"
    if isinstance(result, NoRoute) and result.code == "model_not_found" and table.unprobed:
        # Cold start: some slot has not been asked what it serves yet. Ask (once, shared by
        # every request that misses now), then look again before turning the request away.
        rec.cache_state = "cold"
        await health.cold_probe()
        result = resolve(store.table, model, endpoint, admission.inflight, fallback)
    return _decided(result, rec, scope, model)


def _not_allowed(rec: DecisionRecord, scope: Scope, model: str | None) -> ApiError:
    shown = "the default model" if model is None else f"the model '{model}'"
    return ApiError(
        403,
        "model_not_allowed",
        f"This API key ({rec.client}) may not use {shown}; its models: "
        f"{', '.join(scope.patterns)}.",
        param="model",
    )


async def _follow(
    table: RoutingTable,
    rid: str,
    model: str | None,
    endpoint: str,
    rec: DecisionRecord,
    scope: Scope,
) -> Decision:
    """The slot that made response ``rid``: it alone holds it. Never a guess: an id hal0web
    did not see made is a 404."""
    rec.cache_state = "stale" if store.stale else "fresh"
    slot = await affinity.lookup(rid)
    if slot is None:
        raise ApiError(
            404,
            "response_not_found",
            f"No response with id '{rid}' was made through hal0web (or it is older than "
            f"HAL0_RESPONSE_RETENTION_DAYS = {settings.HAL0_RESPONSE_RETENTION_DAYS:g}).",
        )
    decision = pinned(table, slot, model, endpoint, rid)
    if model is None and isinstance(decision, Decision) and not scope.everything:
        # A response read or cancelled by its id names no model: the key needs a model it
        # may use on that slot (ids are unguessable; the slot is what it reaches).
        pinned_slot = decision.target.slot
        if not any(scope.allows(model_names(pinned_slot, m)) for m in pinned_slot.models):
            rec.decision = decision
            raise _not_allowed(rec, scope, model)
        return _decided(decision, rec, EVERYTHING, model)
    return _decided(decision, rec, scope, model)


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

    def for_target(self, target: Target) -> bytes:
        if target.upstream_model is None:
            return self.raw
        if self._json is not None:
            return bodies.with_model(self._json, target.upstream_model)
        if self._form is not None:
            return bodies.with_form_model(self._form, target.upstream_model)
        return self.raw


def proxy_view(ep: Endpoint) -> View:
    shape = ep.shape

    async def view(request: HttpRequest, **kwargs: str) -> HttpResponseBase:
        started = time.perf_counter()
        request_id = _request_id(request)
        rec = DecisionRecord(request_id=request_id, endpoint=ep.name, model=None, at=time.time())
        try:
            caller = await authorize(request, ep.key_header)
            rec.client = caller.client
            raw = _read_body(request) if request.method == "POST" else b""
            if settings.HAL0_LOG_BODIES:
                rec.body = raw[: settings.HAL0_LOG_BODY_MAX_BYTES]
            body = _Body(ep, request, raw)
            rec.model = body.model
            table = await store.ensure_loaded()
            rid = kwargs.get("response_id") or body.previous
            if rid is not None:
                decision = await _follow(table, rid, body.model, ep.offer, rec, caller.scope)
            else:
                decision = await _resolve(table, body.model, ep.offer, rec, caller.scope)
            rec.added_ms = (time.perf_counter() - started) * 1000
            fwd = await forward(
                decision,
                upstream_path(request.path, request.META.get("QUERY_STRING", "")),
                body.for_target,
                _forward_headers(request, request_id),
                health.suspect,
                method=request.method or "POST",
            )
        except ApiError as err:
            response = error_response(err, shape)
            rec.status, rec.error = err.status, err.code
            _visibility(response, request_id, rec.slot, rec.resolution_path)
            rec.duration_ms = (time.perf_counter() - started) * 1000
            if rec.added_ms is None:  # answered by hal0web itself: all of it was ours
                rec.added_ms = rec.duration_ms
            record(rec)
            return response
        except asyncio.CancelledError:
            # The client went away before the upstream answered. 499 is nginx's "client
            # closed request": the log line still says where the request was going.
            rec.status, rec.error = 499, "client_disconnected"
            rec.duration_ms = (time.perf_counter() - started) * 1000
            record(rec)
            raise
        rec.slot, rec.upstream_model = fwd.slot.name, fwd.upstream_model
        rec.resolution_path = fwd.resolution_path
        rec.status = fwd.response.status_code
        rec.inflight = admission.inflight.get(fwd.slot.name, 0)
        rec.ttfb_ms = (time.perf_counter() - started) * 1000
        if fwd.response.status_code >= 400:
            return await _upstream_failed(fwd, rec, started, shape)
        if fwd.response.is_event_stream:
            return _streaming(fwd, rec, started, shape, ep.records_response)
        if ep.answer == "bytes":
            return _passthrough(fwd, rec, started)
        return await _buffered(fwd, rec, started, shape, ep.records_response)

    view.__name__ = f"v1_{ep.name.replace('/', '_').replace('{', '').replace('}', '')}"
    return _serves(ep.methods, view, ep.label, shape)


# Statuses whose answer has no body to check.
_NO_BODY = frozenset({204, 205, 304})
# How much of an upstream's error answer is read (to quote or pass through); the rest is
# dropped with the connection.
_ERROR_READ_LIMIT = 64 * 1024


# Answers up to this size are parsed whole to check they are JSON (orjson: ~1 ms a MB);
# a larger one (a big batch of embeddings) would hold the event loop, and every stream on
# it, for tens of ms, so only its ends are looked at. (A body cut short is caught anyway:
# its Content-Length or chunked framing is not met.)
_PARSE_CHECK_BYTES = 1024 * 1024


def _is_json(content: bytes) -> bool:
    if len(content) <= _PARSE_CHECK_BYTES:
        try:
            bodies.loads(content)
        except ValueError:
            return False
        return True
    first, last = content[:64].lstrip()[:1], content[-64:].rstrip()[-1:]
    return (first, last) in ((b"{", b"}"), (b"[", b"]"))


def _finish(response: HttpResponse, rec: DecisionRecord, started: float) -> HttpResponse:
    _visibility(response, rec.request_id, rec.slot, rec.resolution_path)
    rec.duration_ms = (time.perf_counter() - started) * 1000
    record(rec)
    return response


def _proxy_error(
    rec: DecisionRecord, err: ApiError, upstream_status: int, shape: str = "openai"
) -> HttpResponse:
    response = error_response(err, shape)
    response["X-Hal0-Upstream-Status"] = str(upstream_status)
    rec.status, rec.error = err.status, err.code
    return response


async def _buffered(
    fwd: Forwarded, rec: DecisionRecord, started: float, shape: str, records_response: bool
) -> HttpResponse:
    status = fwd.response.status_code
    try:
        content = await fwd.response.read(int(settings.HAL0_MAX_RESPONSE_MB * 2**20))
    except UpstreamError as exc:
        if exc.kind == "timeout":  # max_duration_s
            err = ApiError(504, "upstream_timeout", exc.message)
        elif exc.kind == "too_large":
            err = ApiError(
                502,
                "upstream_response_too_large",
                f"Slot '{fwd.slot.name}': {exc.message} (HAL0_MAX_RESPONSE_MB); "
                "ask for less, or stream it.",
            )
        else:
            err = ApiError(502, "upstream_broken", exc.message)
        return _finish(_proxy_error(rec, err, status, shape), rec, started)
    finally:
        admission.release(fwd.slot.name)
    encoded = bool(fwd.response.encoding)  # one we do not decode: it passes as it came
    if status not in _NO_BODY and not encoded and not _is_json(content):
        # An OpenAI client would fail on it with its JSON parser's words, or worse, take a
        # proxy's HTML page for an answer: say what happened instead.
        err = ApiError(
            502,
            "upstream_invalid_response",
            f"Slot '{fwd.slot.name}' answered {status} with a body that is not JSON: "
            f"{excerpt(content) or '(empty)'}",
        )
        return _finish(_proxy_error(rec, err, status, shape), rec, started)
    if records_response:
        rid = response_id(content)
        if rid is not None:
            # Before the client has the id: from then on every worker must find it.
            await affinity.remember(rid, fwd.slot.name)
    response = HttpResponse(content, status=status)
    for key, value in fwd.response.headers():
        response[key] = value
    if not encoded and b'"usage"' in content:
        _usage(rec, content)
    if rec.body is not None:  # HAL0_LOG_BODIES: keep the answer too, capped the same
        rec.answer = content[: settings.HAL0_LOG_BODY_MAX_BYTES]
    return _finish(response, rec, started)


async def _upstream_failed(
    fwd: Forwarded, rec: DecisionRecord, started: float, shape: str
) -> HttpResponse:
    """An upstream's error answer, before any byte reached the client.

    The model server's own OpenAI-shaped error passes as it is (its status and words are
    the most precise thing to tell the client: context too long, a bad parameter). Anything
    else (an HTML error page from a proxy or a crashed server, JSON of another shape, a
    stream) becomes hal0web's own error, ``upstream_error``, with the upstream's status kept
    where it means something to the client and a short excerpt of what it said.
    """
    status = fwd.response.status_code
    try:
        content = await fwd.response.read_prefix(_ERROR_READ_LIMIT)
    finally:
        admission.release(fwd.slot.name)
    data: Any = None
    if not fwd.response.is_event_stream and len(content) < _ERROR_READ_LIMIT:
        try:
            data = bodies.loads(content)
        except ValueError:
            pass
    if is_openai_error(data):
        response = HttpResponse(content, status=status)
        for key, value in fwd.response.headers():
            response[key] = value
        response["X-Hal0-Upstream-Status"] = str(status)
        rec.error = "upstream_error"
        return _finish(response, rec, started)
    said = excerpt(content)
    err = ApiError(
        upstream_error_status(status),
        "upstream_error",
        f"Slot '{fwd.slot.name}' answered {status}" + (f": {said}" if said else " with no body"),
    )
    response = _proxy_error(rec, err, status, shape)
    retry_after = fwd.response.header("retry-after")
    if retry_after and err.status in (429, 503):
        response["Retry-After"] = retry_after
    return _finish(response, rec, started)


def _streaming(
    fwd: Forwarded, rec: DecisionRecord, started: float, shape: str, records_response: bool
) -> StreamingHttpResponse:
    # HAL0_LOG_BODIES: what the client was sent, up to the cap (rec.body is set only then).
    keep = settings.HAL0_LOG_BODY_MAX_BYTES if rec.body is not None else 0
    # A compressed stream (the upstream ignored our Accept-Encoding: identity) goes through
    # as it came, header and all: its bytes are no events to look into or to end with one.
    plain = not fwd.response.encoding
    # A Responses stream names its response in its first event, response.created.
    sniffer = StreamSniffer() if records_response and plain else None

    async def relay() -> AsyncIterator[bytes]:
        tail = b""  # the last bytes sent: does the stream sit between two events?
        usage: bytes | None = None
        kept: list[bytes] = []
        room = keep
        try:
            async for chunk in fwd.response.chunks():
                tail = (tail + chunk)[-4:] if len(chunk) < 4 else chunk[-4:]
                if rec.ttft_ms is None:
                    rec.ttft_ms = (time.perf_counter() - started) * 1000
                if plain and b'"usage"' in chunk:
                    usage = chunk  # the last one wins: OpenAI sends usage in the final chunk
                if room > 0:
                    kept.append(chunk[:room])
                    room -= len(kept[-1])
                if sniffer is not None and not sniffer.done:
                    rid = sniffer.feed(chunk)
                    if rid is not None:  # recorded before the client sees the id
                        await affinity.remember(rid, fwd.slot.name)
                yield chunk
            if plain and not sse_between_events(tail):
                # The upstream ended cleanly as far as HTTP goes, but in the middle of an
                # event: a client's parser would drop the cut event without a word.
                rec.error = "upstream_truncated"
                yield sse_error(
                    rec.error,
                    "the upstream ended the stream in the middle of an event",
                    tail,
                    shape,
                )
        except UpstreamError as exc:
            # Headers are gone already; the only honest thing left is a last error event
            # (in a compressed stream it would be garbage: the cut alone says it failed).
            rec.error = f"upstream_{exc.kind}"
            if plain:
                yield sse_error(rec.error, exc.message, tail, shape)
        except BaseException:
            rec.error = "client_disconnected"
            raise
        finally:
            # Runs on normal end, on upstream failure, and when the client disconnects (Django
            # cancels this generator): closing the response closes the upstream connection.
            await _ended(fwd, rec, started)
            if usage is not None:
                _stream_usage(rec, usage)
            if keep:
                rec.answer = b"".join(kept)
            record(rec)

    response = _relayed(relay(), fwd, rec)
    response["Cache-Control"] = "no-cache"
    return response


async def _ended(fwd: Forwarded, rec: DecisionRecord, started: float) -> None:
    """A relayed body is over (or abandoned): the upstream connection and the slot's place
    go back at once."""
    await fwd.response.aclose()
    admission.release(fwd.slot.name)
    rec.duration_ms = (time.perf_counter() - started) * 1000


def _relayed(
    body: AsyncIterator[bytes], fwd: Forwarded, rec: DecisionRecord
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(body, status=fwd.response.status_code)
    for key, value in fwd.response.headers():
        response[key] = value
    response["X-Accel-Buffering"] = "no"  # nginx must not hold it back
    _visibility(response, rec.request_id, rec.slot, rec.resolution_path)
    return response


def _passthrough(fwd: Forwarded, rec: DecisionRecord, started: float) -> StreamingHttpResponse:
    """A 2xx answer that is bytes, not JSON (speech audio, a transcript as text/srt/vtt):
    passed through as it arrives, unchecked and unchanged."""

    async def relay() -> AsyncIterator[bytes]:
        try:
            async for chunk in fwd.response.chunks():
                if rec.ttft_ms is None:
                    rec.ttft_ms = (time.perf_counter() - started) * 1000
                yield chunk
        except UpstreamError as exc:
            # Audio has no error event: a body cut short must not look whole, so the
            # connection ends without the body's last chunk.
            rec.error = f"upstream_{exc.kind}"
            raise
        except BaseException:
            rec.error = "client_disconnected"
            raise
        finally:
            await _ended(fwd, rec, started)
            record(rec)

    return _relayed(relay(), fwd, rec)


def _serves(methods: tuple[str, ...], view: Any, label: str, shape: str = "openai") -> Any:
    """``view`` answering only ``methods``, with OPTIONS (and CORS) handled around it.

    OPTIONS answers 204 with ``Allow`` (RFC 9110), plus a CORS preflight answer when the
    Origin is one of HAL0_CORS_ORIGINS; any other method not served is 405 with the same
    ``Allow``. Every answer to an allowed origin carries its CORS headers.
    """
    served = frozenset(methods) | {"OPTIONS"}
    allow = ", ".join(sorted(served))

    async def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        origins = settings.HAL0_CORS_ORIGINS
        origin = request.headers.get("Origin")
        response: HttpResponseBase
        refused = _refused(request, origin, origins)
        if refused is not None:
            return _fail(request, refused, shape=shape)
        if request.method == "OPTIONS":
            response = HttpResponse(status=204)
            response["Allow"] = allow
            cors_headers = cors.preflight(
                origin, origins, allow, request.headers.get("Access-Control-Request-Headers")
            )
        else:
            if request.method in served:
                response = await view(request, *args, **kwargs)
            else:
                verbs = " or ".join(m for m in methods if m != "HEAD")
                response = _fail(
                    request,
                    ApiError(405, "method_not_allowed", f"Use {verbs} for {label}."),
                    allow,
                    shape,
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


def _refused(request: HttpRequest, origin: str | None, origins: Set[str]) -> ApiError | None:
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
        given = excerpt(request.META.get("HTTP_HOST", "").encode("latin-1", "replace"), 80)
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


def _usage(rec: DecisionRecord, content: bytes) -> None:
    """Token counts from a JSON answer's ``usage``; anything else in it is left alone.

    Only the ``usage`` object is parsed, not the answer: an embeddings answer can be
    megabytes of vectors. A model's text cannot fake the key: inside a JSON string its
    quotes are escaped (``\\"usage\\"``), so the last bare ``"usage"`` is the key.
    """
    key = content.rfind(b'"usage"')
    start = content.find(b"{", key) if key >= 0 else -1
    if start < 0:
        return
    end = start
    while True:  # the closing brace of the object (usage may nest *_tokens_details)
        end = content.find(b"}", end + 1)
        if end < 0:
            return
        part = content[start : end + 1]
        if part.count(b"{") == part.count(b"}"):
            break
    try:
        _take_usage(rec, orjson.loads(part))
    except orjson.JSONDecodeError:
        return


def _stream_usage(rec: DecisionRecord, chunk: bytes) -> None:
    """Token counts from the stream's chunk that carried ``usage`` (the upstream's choice to
    send; the request is never changed to ask for it)."""
    for line in reversed(chunk.split(b"\n")):
        if line.startswith(b"data:") and b'"usage"' in line:
            try:
                data = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return
            if isinstance(data, dict):
                _take_usage(rec, data.get("usage"))
            return


def _take_usage(rec: DecisionRecord, usage: object) -> None:
    if not isinstance(usage, dict):
        return
    # OpenAI's chat names, or the Responses API's and Anthropic's (input/output_tokens).
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
        rec.prompt_tokens = prompt
    if isinstance(completion, int) and not isinstance(completion, bool) and completion >= 0:
        rec.completion_tokens = completion


def _fail(
    request: HttpRequest, err: ApiError, allow: str | None = None, shape: str = "openai"
) -> HttpResponse:
    response = error_response(err, shape)
    response["X-Request-Id"] = _request_id(request)
    if allow:
        response["Allow"] = allow
    return response


def _entry(model_id: str, fields: Any, owner: str, hal0: dict[str, Any]) -> dict[str, Any]:
    """One /v1/models entry: the upstream's own fields (context_length, capabilities, meta,
    created, owned_by...) as its /models gave them, hal0web's id, and the `hal0` object."""
    return {
        "created": 0,
        "owned_by": owner,
        **fields,
        "id": model_id,
        "object": "model",
        "hal0": hal0,
    }


def _model_entries(table: RoutingTable, everything: bool, scope: Scope) -> list[dict[str, Any]]:
    """Each model once, by its bare id, with the slots serving it (hal0web picks and fails
    over among them). With ``everything`` also the aliases and each slot/model pair: a
    client's model list would show each model two or three times (llama-swap's
    ``includeAliasesInList``). Every listed id routes. Only what ``scope`` allows is
    listed: a key's model allowlist shows in its /v1/models as in its routing."""
    inflight = admission.inflight
    data: list[dict[str, Any]] = []
    for model_id in table.known_ids:
        ranked = [
            c
            for c in candidates(table, model_id, inflight)
            if scope.allows(model_names(c[0], model_id))
        ]
        if not ranked:
            continue
        # Aliases only on request; but a key that may use a model by its alias alone sees
        # the alias (every listed id routes, for the key that lists it).
        if (
            not everything
            and all(s == "alias" for _, _, s in ranked)
            and (
                scope.everything
                or any(scope.allows(model_names(slot, up or "")) for slot, up, _ in ranked)
            )
        ):
            continue
        first = ranked[0][0]
        data.append(
            _entry(
                model_id,
                _upstream_fields(first, model_id),
                first.name,
                {
                    "slots": [
                        {
                            "name": slot.name,
                            "state": slot.state,
                            "source": source,
                            "endpoints": sorted(slot.endpoints),
                        }
                        for slot, _, source in ranked
                    ]
                },
            )
        )
    if not everything:
        return data
    for slot in table.slots.values():
        if not slot.enabled:
            continue
        for model_id, model in slot.models.items():
            if not scope.allows(model_names(slot, model_id)):
                continue
            data.append(
                _entry(
                    f"{slot.name}/{model_id}",
                    _upstream_fields(slot, model_id),
                    slot.name,
                    {
                        "slot": slot.name,
                        "state": slot.state,
                        "source": model.source,
                        "endpoints": sorted(slot.endpoints),
                    },
                )
            )
    return data


def _upstream_fields(slot: Any, model_id: str) -> Any:
    """What the slot's server said of the model (an alias: of the model it stands for)."""
    model = slot.models[model_id]
    if model.source == "alias":
        target = slot.models.get(model.upstream_model)
        return target.upstream_fields if target is not None else {}
    return model.upstream_fields


def _list_all(request: HttpRequest) -> bool:
    flag = request.GET.get("all")
    if flag is None:
        return bool(settings.HAL0_MODELS_LIST_ALL)
    return flag.strip().lower() in ("1", "true", "yes", "on")


_MODELS_KEY_HEADER = BY_NAME["models"].key_header


async def _models(request: HttpRequest) -> HttpResponse:
    try:
        caller = await authorize(request, _MODELS_KEY_HEADER)
    except ApiError as err:
        return _fail(request, err)
    table = await store.ensure_loaded()
    return HttpResponse(
        orjson.dumps(
            {"object": "list", "data": _model_entries(table, _list_all(request), caller.scope)}
        ),
        content_type="application/json",
    )


async def _model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        caller = await authorize(request, _MODELS_KEY_HEADER)
    except ApiError as err:
        return _fail(request, err)
    table = await store.ensure_loaded()
    # A model out of the key's scope is as unknown to it as one nobody serves.
    for entry in _model_entries(table, True, caller.scope):
        if entry["id"] == model_id:
            return HttpResponse(orjson.dumps(entry), content_type="application/json")
    return _fail(
        request,
        ApiError(404, "model_not_found", f"The model '{model_id}' does not exist.", param="model"),
    )


def _own_view(ep: Endpoint) -> View:
    # GET and HEAD (the server sends HEAD's headers without the body).
    handler = {"models": _models, "models/{id}": _model_detail}[ep.name]
    return _serves(ep.methods, handler, ep.label)


# Each entry of the endpoint table, its view (hal0web/urls.py routes its paths to it).
VIEWS: dict[str, View] = {
    ep.name: (_own_view(ep) if ep.model_in == "none" else proxy_view(ep)) for ep in ENDPOINTS
}


async def not_found(request: HttpRequest, path: str) -> HttpResponse:
    origin, origins = request.headers.get("Origin"), settings.HAL0_CORS_ORIGINS
    refused = _refused(request, origin, origins)
    if refused is not None:
        return _fail(request, refused)
    response = _fail(
        request,
        ApiError(
            404,
            "not_found",
            f"Unknown endpoint /v1/{path}. {SERVED_TEXT}.",
        ),
    )
    # A browser app can read the 404 too.
    for key, value in cors.actual(origin, origins).items():
        response[key] = value
    return response


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 while the slot state is kept fresh; 503 once it is stale (no watcher keeps it,
    or this process cannot read the database), so a load balancer stops trusting it."""
    table = await store.ensure_loaded()
    health.ensure_running()
    watcher = store.freshness()
    response = JsonResponse(
        {
            "ok": not watcher["stale"],
            "version": table.version,
            "slots": {
                s.name: (
                    states.DISABLED
                    if not s.enabled
                    else states.DEGRADED
                    if s.state == states.READY and outliers.degraded(s.name)
                    else s.state
                )
                for s in table.slots.values()
            },
            "watcher": watcher,
        },
        status=503 if watcher["stale"] else 200,
    )
    # A 503 here is an answer, not a server error: Django would log each one as an ERROR
    # (hal0.sync already warned once, when the state turned stale).
    response._has_been_logged = True  # type: ignore[attr-defined]
    return response
