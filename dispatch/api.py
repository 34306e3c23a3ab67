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

from dispatch import bodies, cors, health
from dispatch.admission import admission
from dispatch.decisions import DecisionRecord, record
from dispatch.errors import (
    ApiError,
    error_response,
    excerpt,
    is_openai_error,
    sse_between_events,
    sse_error,
    upstream_error_status,
)
from dispatch.forward import Forwarded, forward
from dispatch.keys import authorize
from dispatch.outliers import outliers
from dispatch.proxy import UpstreamError
from dispatch.resolver import Decision, NoRoute, Target, resolve
from dispatch.scopes import Scope, model_names
from dispatch.store import store
from dispatch.table import RoutingTable

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
    rec.latency_us = result.latency_us
    if isinstance(result, Decision) and not scope.everything:
        narrowed = scope.narrow(result)
        if narrowed is None:
            rec.decision = result
            shown = "the default model" if model is None else f"the model '{model}'"
            raise ApiError(
                403,
                "model_not_allowed",
                f"This API key ({rec.client}) may not use {shown}; its models: "
                f"{', '.join(scope.patterns)}.",
                param="model",
            )
        result = narrowed
    rec.decision = result
    if isinstance(result, NoRoute):
        rec.slot = result.slot
        raise ApiError(result.status, result.code, result.message, param="model")
    rec.slot, rec.upstream_model = result.slot, result.upstream_model
    rec.resolution_path = result.resolution_path
    # The counts the ranking saw, kept for the explanation (they move on at once).
    inflight = admission.inflight
    rec.seen_inflight = tuple(inflight.get(t.slot.name, 0) for t in result.targets)
    return result


def proxy_view(endpoint: str) -> View:
    async def view(request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        request_id = _request_id(request)
        rec = DecisionRecord(request_id=request_id, endpoint=endpoint, model=None, at=time.time())
        try:
            caller = await authorize(request)
            rec.client = caller.client
            raw = _read_body(request)
            if settings.HAL0_LOG_BODIES:
                rec.body = raw[: settings.HAL0_LOG_BODY_MAX_BYTES]
            body = bodies.parse(raw)
            rec.model = body.model
            table = await store.ensure_loaded()
            decision = await _resolve(table, body.model, endpoint, rec, caller.scope)
            rec.added_ms = (time.perf_counter() - started) * 1000

            def body_for(target: Target) -> bytes:
                if target.upstream_model is None:
                    return body.raw
                return bodies.with_model(body, target.upstream_model)

            fwd = await forward(
                decision, endpoint, body_for, _forward_headers(request, request_id), health.suspect
            )
        except ApiError as err:
            response = error_response(err)
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
            return await _upstream_failed(fwd, rec, started)
        if fwd.response.is_event_stream:
            return _streaming(fwd, rec, started)
        return await _buffered(fwd, rec, started)

    view.__name__ = f"v1_{endpoint.replace('/', '_')}"
    return _serves(("POST",), view, f"/v1/{endpoint}")


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


def _proxy_error(rec: DecisionRecord, err: ApiError, upstream_status: int) -> HttpResponse:
    response = error_response(err)
    response["X-Hal0-Upstream-Status"] = str(upstream_status)
    rec.status, rec.error = err.status, err.code
    return response


async def _buffered(fwd: Forwarded, rec: DecisionRecord, started: float) -> HttpResponse:
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
        return _finish(_proxy_error(rec, err, status), rec, started)
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
        return _finish(_proxy_error(rec, err, status), rec, started)
    response = HttpResponse(content, status=status)
    for key, value in fwd.response.headers():
        response[key] = value
    if not encoded and b'"usage"' in content:
        _usage(rec, content)
    if rec.body is not None:  # HAL0_LOG_BODIES: keep the answer too, capped the same
        rec.answer = content[: settings.HAL0_LOG_BODY_MAX_BYTES]
    return _finish(response, rec, started)


async def _upstream_failed(fwd: Forwarded, rec: DecisionRecord, started: float) -> HttpResponse:
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
    response = _proxy_error(rec, err, status)
    retry_after = fwd.response.header("retry-after")
    if retry_after and err.status in (429, 503):
        response["Retry-After"] = retry_after
    return _finish(response, rec, started)


def _streaming(fwd: Forwarded, rec: DecisionRecord, started: float) -> StreamingHttpResponse:
    # HAL0_LOG_BODIES: what the client was sent, up to the cap (rec.body is set only then).
    keep = settings.HAL0_LOG_BODY_MAX_BYTES if rec.body is not None else 0
    # A compressed stream (the upstream ignored our Accept-Encoding: identity) goes through
    # as it came, header and all: its bytes are no events to look into or to end with one.
    plain = not fwd.response.encoding

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
                yield chunk
            if plain and not sse_between_events(tail):
                # The upstream ended cleanly as far as HTTP goes, but in the middle of an
                # event: a client's parser would drop the cut event without a word.
                rec.error = "upstream_truncated"
                yield sse_error(
                    rec.error, "the upstream ended the stream in the middle of an event", tail
                )
        except UpstreamError as exc:
            # Headers are gone already; the only honest thing left is a last error event
            # (in a compressed stream it would be garbage: the cut alone says it failed).
            rec.error = f"upstream_{exc.kind}"
            if plain:
                yield sse_error(rec.error, exc.message, tail)
        except BaseException:
            rec.error = "client_disconnected"
            raise
        finally:
            # Runs on normal end, on upstream failure, and when the client disconnects (Django
            # cancels this generator): closing the response closes the upstream connection.
            await fwd.response.aclose()
            admission.release(fwd.slot.name)
            rec.duration_ms = (time.perf_counter() - started) * 1000
            if usage is not None:
                _stream_usage(rec, usage)
            if keep:
                rec.answer = b"".join(kept)
            record(rec)

    response = StreamingHttpResponse(relay(), status=fwd.response.status_code)
    for key, value in fwd.response.headers():
        response[key] = value
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    _visibility(response, rec.request_id, rec.slot, rec.resolution_path)
    return response


def _serves(methods: tuple[str, ...], view: Any, label: str) -> Any:
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
            return _fail(request, refused)
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
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
        rec.prompt_tokens = prompt
    if isinstance(completion, int) and not isinstance(completion, bool) and completion >= 0:
        rec.completion_tokens = completion


chat_completions = proxy_view("chat/completions")
completions = proxy_view("completions")
embeddings = proxy_view("embeddings")


def _fail(request: HttpRequest, err: ApiError, allow: str | None = None) -> HttpResponse:
    response = error_response(err)
    response["X-Request-Id"] = _request_id(request)
    if allow:
        response["Allow"] = allow
    return response


def _model_entries(table: RoutingTable, scope: Scope) -> list[dict[str, Any]]:
    """One entry per bare model id, then one per slot/model pair: those ``scope`` allows."""
    created = 0
    data: list[dict[str, Any]] = []
    for model_id in table.known_ids:
        if not scope.everything and not any(
            scope.allows(model_names(table.slots[name], model_id))
            for name in table.by_model[model_id]
        ):
            continue
        decision = resolve(table, model_id, "chat/completions", admission.inflight)
        owner = decision.slot if isinstance(decision, Decision) else None
        data.append(
            {
                "id": model_id,
                "object": "model",
                "created": created,
                "owned_by": owner or "hal0web",
                "hal0": {
                    "slots": [
                        {
                            "name": name,
                            "state": table.slots[name].state,
                            "source": table.slots[name].models[model_id].source,
                        }
                        for name in table.by_model[model_id]
                    ]
                },
            }
        )
    for slot in table.slots.values():
        if not slot.enabled:
            continue
        for model_id, entry in slot.models.items():
            if not scope.allows(model_names(slot, model_id)):
                continue
            data.append(
                {
                    "id": f"{slot.name}/{model_id}",
                    "object": "model",
                    "created": created,
                    "owned_by": slot.name,
                    "hal0": {"slot": slot.name, "state": slot.state, "source": entry.source},
                }
            )
    return data


async def _models(request: HttpRequest) -> HttpResponse:
    try:
        caller = await authorize(request)
    except ApiError as err:
        return _fail(request, err)
    table = await store.ensure_loaded()
    return HttpResponse(
        orjson.dumps({"object": "list", "data": _model_entries(table, caller.scope)}),
        content_type="application/json",
    )


async def _model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        caller = await authorize(request)
    except ApiError as err:
        return _fail(request, err)
    table = await store.ensure_loaded()
    # A model out of the key's scope is as unknown to it as one nobody serves.
    for entry in _model_entries(table, caller.scope):
        if entry["id"] == model_id:
            return HttpResponse(orjson.dumps(entry), content_type="application/json")
    return _fail(
        request,
        ApiError(404, "model_not_found", f"The model '{model_id}' does not exist.", param="model"),
    )


# GET and HEAD (the server sends HEAD's headers without the body).
models = _serves(("GET", "HEAD"), _models, "/v1/models")
model_detail = _serves(("GET", "HEAD"), _model_detail, "/v1/models/{id}")


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
            f"Unknown endpoint /v1/{path}. hal0web serves chat/completions, completions, "
            "embeddings and models.",
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
                    "disabled"
                    if not s.enabled
                    else "degraded"
                    if s.state == "ready" and outliers.degraded(s.name)
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
