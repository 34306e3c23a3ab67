"""Process runtime: the middleware-free handler for /v1, and start-up/shutdown of the watcher
and the upstream client around whichever ASGI server runs us."""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestAborted, RequestDataTooBig
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpRequest, HttpResponseBase
from django.urls import set_script_prefix, set_urlconf

from dispatch.api.drain import drain
from dispatch.api.request import ApiRequest
from dispatch.conf import conf
from dispatch.coordination import events, leases, stored_responses
from dispatch.coordination.affinity import affinity
from dispatch.coordination.outages import Unavailable
from dispatch.coordination.store import store
from dispatch.lifecycle.leadership import ensure_running, leadership
from dispatch.lifecycle.watcher import watcher
from dispatch.observability import keyuse, requestlog
from dispatch.routing.endpoints import API_PREFIXES, ENDPOINTS, ROOT_PATHS
from dispatch.upstream.admission import admission
from dispatch.upstream.client import upstream

log = logging.getLogger("hal0.runtime")

_PREFIXES = tuple(API_PREFIXES)  # /v1/ and Ollama's /api/: wholly the API's

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]


class _BodyTooBig(io.BytesIO):
    """A body that went past HAL0_MAX_BODY_MB: reading it raises, as Django's own check does."""

    def read(self, size: int | None = -1, /) -> bytes:
        raise RequestDataTooBig()


class BareASGIHandler(ASGIHandler):
    """Django's ASGI handler, lean for /v1: async end to end, no thread hop per request.

    The stock handler spends two or three thread hops on every request (bench: ~1 ms of CPU
    each under load): a ThreadSensitiveContext (a new executor per request), the
    request_started/request_finished signals (their receivers manage database connections
    through ``sync_to_async``) and ``response.close()`` through ``sync_to_async``. /v1 views
    never touch the ORM per request, so this handler does without all three, and without
    middleware: the API does its own (async) checks in the views. What little sync work it
    does (a first table load, a page session lookup) runs in asgiref's one shared thread,
    whose connections the watcher keeps fresh (``dispatch.lifecycle.persistence.apply``).
    """

    request_class = ApiRequest  # META built only when read (dispatch/api/request.py)

    def load_middleware(self, is_async: bool = False) -> None:
        from dispatch.api.views import VIEWS  # the views import this room's siblings

        self._exact = {
            f"/{path}": convert_exception_to_response(VIEWS[ep.name])
            for ep in ENDPOINTS
            for path in ep.paths
            if "<" not in path
        }
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        # Private names of BaseHandler, stable since Django 3.1; the stubs do not list them.
        get_response = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        self._middleware_chain = convert_exception_to_response(get_response)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handle(scope, receive, send)

    async def read_body(self, receive: Receive) -> io.BytesIO:
        # A /v1 body is JSON the view reads into memory whole anyway, bounded by
        # HAL0_MAX_BODY_MB; Django's spooled temp file would cost more than most bodies.
        # The bound holds while reading, so a chunked upload cannot grow past it either: past
        # it, reading stops and the view, reading the body, answers 413 in its own words.
        limit = conf.DATA_UPLOAD_MAX_MEMORY_SIZE
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestAborted()
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:
                return _BodyTooBig()
            parts.append(chunk)
            if not message.get("more_body", False):
                return io.BytesIO(b"".join(parts))

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        # As Django does, a disconnect while the view runs or streams cancels it, so a
        # streaming view's generator is closed and the upstream request with it. Django runs
        # the view in a second task beside the listener; cancelling this one instead saves
        # a task and an asyncio.wait per request.
        task = asyncio.current_task()
        assert task is not None
        aborted = False

        async def cancel_on_disconnect() -> None:
            nonlocal aborted
            # After the whole body, the only message left to receive is http.disconnect. (Past
            # HAL0_MAX_BODY_MB it is more body, unread: the 413 goes out without a listener.)
            if (await receive())["type"] == "http.disconnect":
                aborted = True
                task.cancel()

        listener = asyncio.create_task(cancel_on_disconnect())
        response: HttpResponseBase | None = None
        try:
            response = await self._respond(scope, body_file)
            # What SecurityMiddleware adds to every other answer, and /v1 has no middleware:
            # a browser must never sniff an error's text or a stream as HTML to run. (Into
            # the store send_response reads, as ResponseHeaders keeps it: its setdefault
            # looks the name up by raising KeyError, then checks both strings again.)
            response.headers._store.setdefault(
                "x-content-type-options", ("X-Content-Type-Options", "nosniff")
            )
            await self.send_response(response, send)
        except asyncio.CancelledError:
            if not aborted:
                raise  # the server is shutting down: let it
            task.uncancel()  # the client went away: that ends this request, not the server
        finally:
            listener.cancel()
            if response is not None:
                # What response.close() does, minus the request_finished signal (see above).
                for closer in response._resource_closers:  # type: ignore[attr-defined]
                    closer()

    async def _respond(self, scope: Scope, body_file: io.BytesIO) -> HttpResponseBase:
        """The view's response; the request (and its body) go as soon as the view returns.

        A stream can run for minutes, thousands at once, each from a prompt of tens of KB:
        once the upstream has the body nothing here needs it, so nothing keeps it.
        """
        request, error_response = self.create_request(scope, body_file)
        if request is None:  # Django's own 400 (or 413) for a malformed request
            body_file.close()
            assert error_response is not None  # create_request gives one or the other
            return error_response
        try:
            return await self.get_response_async(request)
        finally:
            request.close()
            body_file.close()  # frees its buffer: the body's last reference here

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        # Django's version also logs every 4xx/5xx answer, through a thread hop each. /v1
        # logs every request itself (hal0.dispatch), with more to say; uncaught exceptions
        # are still logged by convert_exception_to_response.
        view = self._exact.get(request.path_info)
        if view is not None:
            # A path of the endpoint table, spelt out: its view at once, without walking
            # the URL patterns (resolving took a twentieth of a request's instructions).
            response: HttpResponseBase = await view(request)  # type: ignore[misc]
            return response
        # Only Django's URL patterns (and what they answer) may reverse a URL: the script
        # prefix is set for them alone (an asgiref Local write the exact paths never need).
        set_script_prefix(request.script_name)  # type: ignore[attr-defined]
        set_urlconf(conf.ROOT_URLCONF)
        response = await self._middleware_chain(request)  # type: ignore[misc]
        return response

    async def send_response(self, response: HttpResponseBase, send: Send) -> None:
        """Django's ``send_response`` without its re-chunking: a stream's parts go out as
        the relay yields them (each an upstream read or a translated event, already bytes),
        and a whole body in one message, with its Content-Length."""
        if response.streaming and not response.is_async:  # type: ignore[attr-defined]
            # A stream from a sync iterator (none of the relay's is): Django's own way maps it.
            await super().send_response(response, send)
            return
        # The (name, value) pairs as ResponseHeaders keeps them (its private store, stable
        # since Django 3.2): the Mapping's items() would look every name up again.
        store = response.headers._store
        # (Names are ASCII, checked as they were set: UTF-8 encodes them the same, faster.)
        headers = [(name.encode(), value.encode("latin-1")) for name, value in store.values()]
        if response.cookies:
            for cookie in response.cookies.values():
                headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
        status = response.status_code
        if not response.streaming:
            body = response.content  # type: ignore[attr-defined]
            # A whole body says its length: without it the server sends it chunked (the
            # middleware that would add it, CommonMiddleware, is not on /v1). 204 and 304
            # have none to say, and a 1xx is no answer with a body.
            if status >= 200 and status not in (204, 304) and "content-length" not in store:
                headers.append((b"Content-Length", b"%d" % len(body)))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})
        async with aclosing(aiter(response.streaming_content)) as parts:  # type: ignore[attr-defined]
            async for part in parts:
                if part:  # an empty body message would say nothing
                    await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body"})


def api_asgi_application() -> BareASGIHandler:
    return BareASGIHandler()


class Hal0Application:
    """Routes /v1 and /api (and the API paths outside them, such as /rerank) to the bare handler and starts the watcher with the first connection.

    Daphne sends no ASGI lifespan events, so the runtime starts lazily on the first scope of
    any kind; under a server that does send them (Uvicorn) it starts at start-up and the
    upstream client is closed cleanly at shutdown.
    """

    # At shutdown, how long the request log's writer may take to write what is queued.
    REQUEST_LOG_FLUSH_S = 5.0

    def __init__(self, app: Any, api: Any) -> None:
        self.app = app
        self.api = api
        self._started = False

    async def _startup(self) -> None:
        if not self._started:
            # Before anything starts: a second server on the embedded database is refused
            # (each request gets the error again, so it cannot half-start).
            leases.claim_embedded()
            self._started = True
            if conf.REDIS_URL:
                # Several processes share Redis: max_concurrency holds across all of them.
                from dispatch.coordination.redis_places import RedisPlaces

                admission.gate = RedisPlaces(conf.REDIS_URL)
            events.bind_loop(asyncio.get_running_loop())
            try:
                await store.ensure_loaded()
            except Unavailable:
                # The database is away (warned once): start anyway. /healthz says 503 "no
                # routing table yet", /v1 503 table_unavailable, until it is back; then the
                # first request (or the version check) reads the table.
                pass
            ensure_running()
            _on_daphne_shutdown(self._shutdown)
            # Everything loaded so far (Django, the app, the table) lives as long as the
            # process: take it out of the collector's sight, so full collections stay short
            # and do not stall the streams this loop carries.
            gc.freeze()

    async def _shutdown(self) -> None:
        try:
            # The last uses since the last batch: the admin's "last used" stays true.
            await sync_to_async(keyuse.recorder.flush, thread_sensitive=True)()
        except Exception:
            log.warning("could not record when API keys were last used", exc_info=True)
        if admission.gate is not None:
            await admission.gate.aclose()
        await leadership.stop()
        await watcher.stop()
        await affinity.aclose()
        stored_responses.pending.close()
        await upstream.aclose()
        # The request log's rows (the drain's cut requests' among them: decisions go to the
        # outputs at the loop's next turn, which the awaits above gave) are written by a
        # thread of their own: wait for them. Uvicorn ends the process by raising the stop
        # signal again, which runs no atexit handler: what is still queued then is lost.
        written = await sync_to_async(requestlog.writer.flush, thread_sensitive=False)(
            self.REQUEST_LOG_FLUSH_S
        )
        if not written:
            log.warning(
                "request-log rows still unwritten at shutdown after %g s", self.REQUEST_LOG_FLUSH_S
            )

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if not self._started:
            await self._startup()
        if scope["type"] == "http" and (
            scope["path"].startswith(_PREFIXES) or scope["path"] in ROOT_PATHS
        ):
            await self.api(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._startup()
                except Exception as exc:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                # The server's stop signal starts the drain (dispatch/api/drain.py): the
                # lifespan's own shutdown comes only after the server has drained.
                drain.watch(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _on_daphne_shutdown(shutdown: Callable[[], Awaitable[None]]) -> None:
    """Daphne sends no lifespan events; close cleanly when its Twisted reactor stops."""
    # Look the reactor up without importing it: importing installs one, which must never
    # happen under another server.
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is None or not getattr(reactor, "running", False):
        return
    from twisted.internet.defer import Deferred

    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromFuture(asyncio.ensure_future(shutdown()))
    )
