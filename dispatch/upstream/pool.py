"""httpx's transport API over aiohttp's connection pool (see ``AiohttpTransport``)."""

from __future__ import annotations

import contextvars
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import aiohttp.payload
import httpx


def describe(exc: BaseException) -> str:
    """An exception in a line a client can read (its message, cut short)."""
    text = str(exc) or type(exc).__name__
    return text[:300]


# Pool size: one connection per concurrent upstream request. Slots' own max_concurrency
# limits what they take; this only has to stay out of the way of thousands of held streams.
POOL_CONNECTIONS = 10_000
POOL_KEEPALIVE_S = 30.0
# The request's URL as text, when the caller has it (``dispatch.upstream.client``): saves
# rendering ``request.url`` back to text for aiohttp on every request.
URL_TEXT = "hal0.url"
# The request's headers as text, (lower-case name, value) pairs, as aiohttp takes them, in
# place of ``request.headers`` (``dispatch.upstream.client`` gives them so, and no others, to
# this transport alone): httpx's Headers hold bytes, which would be encoded for them and
# decoded back for aiohttp on every request.
HEADERS_TEXT = "hal0.headers"


class AiohttpStream(httpx.AsyncByteStream):
    """An aiohttp response body as httpx sees it: each read as it arrived, never re-chunked.

    Its own iterator, each ``__anext__`` one ``readany()``: an async generator over
    ``iter_any()`` put two more layers (a generator and aiohttp's iterator) on every chunk
    of a stream. ``ready`` gives what has come already, without waiting.
    """

    # What a read of the body fails with, for a reader that awaits ``read`` itself:
    # ``failed`` tells one as ``__anext__`` does.
    FAILURES: tuple[type[aiohttp.ClientError], ...] = (
        aiohttp.ClientPayloadError,
        aiohttp.ClientConnectionError,
    )

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        # aiohttp's readany: each piece as it came, b"" at the end. A reader that awaits it
        # itself (UpstreamResponse.chunks) has one await a piece, not two.
        self.read = response.content.readany

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self.read()
        except self.FAILURES as exc:
            raise self.failed(exc) from exc
        if not chunk:  # readany's word for the end of the body
            raise StopAsyncIteration
        return chunk

    def ready(self) -> bytes | None:
        """What ``__anext__`` would give at once, if it would: the body's next piece when it
        has come already, b"" when the body is over; None when a read would have to wait."""
        content = self._response.content
        try:
            chunk = content.read_nowait()  # what readany gives without waiting
        except self.FAILURES as exc:
            raise self.failed(exc) from exc
        if chunk or content.at_eof():
            return chunk
        return None

    def failed(self, exc: aiohttp.ClientError) -> httpx.TransportError:
        """A read's failure as httpx tells it (its cause set to ``exc``)."""
        self._response.close()  # a connection that failed mid-body is not reusable
        told: httpx.TransportError
        if isinstance(exc, aiohttp.ServerTimeoutError):
            told = httpx.ReadTimeout(str(exc) or "read timed out")
        else:
            told = httpx.ReadError(_cut_reason(exc))
        told.__cause__ = exc
        return told

    async def aclose(self) -> None:
        # A body read to its end returns the connection to the pool; one abandoned half way
        # (a client that went away) closes it, so the upstream sees the disconnect at once.
        self._response.release()


def _cut_reason(exc: BaseException) -> str:
    """Why a body stopped, in a client's words rather than aiohttp's internals (a client
    sees this in its last error event; "<TransferEncodingError: 400, ...>" tells it
    nothing it can act on)."""
    causes: list[BaseException] = [exc]
    while len(causes) < 5:
        nxt = causes[-1].__cause__ or causes[-1].__context__
        if nxt is None:
            break
        causes.append(nxt)
    # aiohttp names the reset only in its message on some paths: look there too.
    if any(isinstance(c, ConnectionResetError) for c in causes) or "reset by peer" in str(exc):
        return "the upstream reset the connection mid-body"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the upstream closed the connection before the end of the body"
    return describe(exc)


class _InMemoryBody(aiohttp.payload.BytesPayload):
    """A request body already in memory, handed to the connection in one write.

    aiohttp's own BytesPayload warns (ResourceWarning) past 1 MiB that this "might lock the
    event loop"; the write only queues the bytes on the transport, and a prompt of a few MB
    (a long chat, a pasted file) is ordinary for a model server.
    """

    def __init__(self, value: bytes) -> None:
        aiohttp.payload.Payload.__init__(self, value, content_type="application/octet-stream")
        self._size = len(value)


class _Sent:
    """What one request's trip through aiohttp's pool looked like."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


# The request being sent in this task: the connector marks it when it hands out a pooled
# connection (aiohttp awaits the connector in the caller's task, so the context is ours).
_sending: contextvars.ContextVar[_Sent | None] = contextvars.ContextVar(
    "hal0_sending", default=None
)


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, telling a request given a kept-alive connection from one given a
    new connection. (aiohttp's tracing says the same, but its per-request Trace objects and
    signal sends cost ~5 % of the seam's CPU; this costs one weak-set lookup.)"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._handed_out: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        protocol = conn.protocol
        if protocol is not None:
            if protocol in self._handed_out:
                sent = _sending.get()
                if sent is not None:
                    sent.reused = True
            else:
                self._handed_out.add(protocol)
        return conn


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's API over aiohttp's connection pool.

    Chosen by measurement (docs/performance.md): httpx's own pool serializes under
    concurrency. aiohttp's errors are mapped to the httpx exceptions ``Upstream.open`` tells
    apart: refused -> ConnectError (502), connect timeout -> ConnectTimeout (504), reset or
    cut -> ReadError / RemoteProtocolError.
    """

    def __init__(self, max_connections: int = POOL_CONNECTIONS) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # no pool: the retry's own session
        # One ClientTimeout per (connect, read) pair: slots have a handful between them.
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    def _new_session(self, pooled: bool) -> aiohttp.ClientSession:
        connector = (
            _Connector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=POOL_KEEPALIVE_S,
                ttl_dns_cache=60,
            )
            if pooled
            else aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=0, ttl_dns_cache=60, force_close=True
            )
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes go through as the upstream sent them
            trust_env=False,  # a local router must not wander off through a system proxy
            # Requests of different users share this session: no cookie may outlive the
            # answer that set it.
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    def _get_session(self, pooled: bool = True) -> aiohttp.ClientSession:
        if pooled:
            if self._session is None or self._session.closed:
                self._session = self._new_session(pooled=True)
            return self._session
        if self._fresh is None or self._fresh.closed:
            self._fresh = self._new_session(pooled=False)
        return self._fresh

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        stream = request.stream
        # A body in memory (Upstream.open's always is) taken as it is, without httpx's
        # ``read()`` (its checks, and a fresh stream to hold what it read).
        body = b"".join(stream) if isinstance(stream, httpx.ByteStream) else await request.aread()
        sent = _Sent()
        try:
            try:
                response = await self._request(self._get_session(), request, body, timeout, sent)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if not sent.reused:
                    raise
                # The pooled connection was closed by the upstream before it answered (an
                # idle keep-alive it dropped as we picked it): the request died with it, so
                # it goes out once more, on a connection opened for it. A fresh connection
                # that drops is a real failure and is not retried: the upstream may have
                # taken the request, and sending it twice could run it twice.
                response = await self._request(
                    self._get_session(pooled=False), request, body, timeout, _Sent()
                )
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
        except aiohttp.ServerTimeoutError as exc:
            raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(
                str(exc) or "server disconnected", request=request
            ) from exc
        except aiohttp.ClientError as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=AiohttpStream(response),
            # No request= here: the response would keep it, and with it the request body,
            # for as long as a stream runs (see Upstream._send).
            extensions=extensions,
        )

    async def _request(
        self,
        session: aiohttp.ClientSession,
        request: httpx.Request,
        body: bytes,
        timeout: Mapping[str, Any],
        sent: _Sent,
    ) -> aiohttp.ClientResponse:
        limits = (timeout.get("connect"), timeout.get("read"))
        client_timeout = self._timeouts.get(limits)
        if client_timeout is None:
            client_timeout = self._timeouts[limits] = aiohttp.ClientTimeout(
                total=None, sock_connect=limits[0], sock_read=limits[1]
            )
        token = _sending.set(sent)
        try:
            return await session.request(
                request.method,
                request.extensions.get(URL_TEXT) or str(request.url),
                headers=request.extensions.get(HEADERS_TEXT) or request.headers.multi_items(),
                data=_InMemoryBody(body) if body else None,
                allow_redirects=False,
                compress=False,
                timeout=client_timeout,
            )
        finally:
            _sending.reset(token)

    async def aclose(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None
