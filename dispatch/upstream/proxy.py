"""The one seam to upstream servers, and the only module that imports httpx.

Requests are opened here and their bodies streamed back raw; health probes use the same
transport. Callers see ``UpstreamResponse`` and ``UpstreamError``, never httpx, so the
transport behind the seam can change (the performance issue chooses it by measurement)
without touching them.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import os
import weakref
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import aiohttp.payload
import httpx

from dispatch.lib import redact
from dispatch.routing.table import SlotEntry

# Connection-level headers (RFC 9110 §7.6.1) and ones we recompute; never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Client headers that belong to hal0web, not to the upstream: the client's credentials for
# us (in every header the SDKs put them: OpenAI's, Azure's, Anthropic's) and for a proxy
# between, the WebUI's session and CSRF cookies, and encodings (we ask upstreams for
# identity so SSE is never held back by a compressor). A slot's own credential is added
# from its api_key_env.
_NOT_UPSTREAM = HOP_BY_HOP | {
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
    "cookie",
    "x-csrftoken",
    "accept-encoding",
    "origin",
    "referer",
}
# Upstream headers that are not the client's business: its cookies, its identity, and its
# CORS answer (which browser origins may read /v1 is hal0web's decision: HAL0_CORS_ORIGINS).
_NOT_DOWNSTREAM = HOP_BY_HOP | {"set-cookie", "server", "date"}
_NOT_DOWNSTREAM_PREFIX = "access-control-"
# Encodings a buffered answer is decoded from (under a cap) to be checked and read; any other
# passes through as it came, with its Content-Encoding.
_DECODED = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UpstreamError(Exception):
    """A transport failure talking to a slot.

    ``kind`` is one of: ``unreachable`` (refused, DNS, reset before any response),
    ``timeout`` (no response headers in time, or no connection in time), ``idle`` (a stream
    went quiet for longer than the slot's idle timeout), ``broken`` (the connection failed
    mid-body).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: int | None  # None: no HTTP answer at all
    body: Any  # parsed JSON, or None
    error: str = ""
    timed_out: bool = False  # connected (or tried to) but no answer in time: slow, not gone


class UpstreamResponse:
    """An upstream's answer, headers in; its body read with the slot's timeouts.

    ``idle_timeout_s`` is the longest silence allowed between two pieces of the body,
    streaming or not: a slow but steady answer is not a dead one. ``deadline`` (loop time,
    from the slot's ``max_duration_s``) caps the whole request when set.

    A body the upstream compressed (though asked for identity) streams through as it is,
    with its Content-Encoding; ``read`` decodes gzip and deflate under its cap and then
    drops that header.
    """

    def __init__(
        self,
        response: httpx.Response,
        idle_timeout_s: float,
        deadline: float | None = None,
        max_duration_s: float = 0.0,
    ) -> None:
        self._response = response
        self._idle = idle_timeout_s
        self._deadline = deadline
        self._max_duration = max_duration_s
        self.status_code = response.status_code
        self.encoding = response.headers.get("content-encoding", "").strip().lower()
        if self.encoding == "identity":
            self.encoding = ""

    @property
    def content_type(self) -> str:
        return self._response.headers.get("content-type", "")

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def header(self, name: str) -> str | None:
        return self._response.headers.get(name)

    def headers(self) -> Iterable[tuple[str, str]]:
        for key, value in self._response.headers.multi_items():
            name = key.lower()
            if name in _NOT_DOWNSTREAM or name.startswith(_NOT_DOWNSTREAM_PREFIX):
                continue
            if name == "content-encoding" and not self.encoding:
                continue  # decoded by read(), or identity
            yield key, value

    async def read(self, limit: int) -> bytes:
        """The whole body, decoded from gzip or deflate, at most ``limit`` bytes of it
        (else ``UpstreamError("too_large")``); each piece within the idle timeout.

        The cap holds while decoding, piece by piece: a 10 KB gzip bomb never becomes 10 MB
        in memory on the way to being refused.
        """
        body = BoundedBody(self.encoding, limit)
        try:
            async for chunk in self.chunks():
                body.add(chunk)
        finally:
            await self._response.aclose()
        if body.decoded:
            self.encoding = ""
        return body.value()

    async def read_prefix(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body (an error page, to quote), then close: an
        upstream's error answer cannot make us hold megabytes."""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in self.chunks():
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
        except UpstreamError:
            pass  # what arrived before the failure is all there is to quote
        finally:
            await self._response.aclose()
        return b"".join(parts)[:limit]

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the upstream sends it: no re-chunking, no buffering."""
        if self._response.is_stream_consumed:
            # Built in memory with its body already read (httpx.MockTransport at the seam).
            if self._response.content:
                yield self._response.content
            return
        raw = self._response.aiter_raw().__aiter__()
        loop = asyncio.get_running_loop()
        while True:
            wait, capped = self._idle, False
            if self._deadline is not None:
                left = self._deadline - loop.time()
                if left <= wait:
                    wait, capped = max(left, 0.0), True
            try:
                async with asyncio.timeout(wait):
                    chunk = await raw.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError as exc:
                if capped:
                    raise UpstreamError("timeout", self.over_time()) from exc
                raise UpstreamError(
                    "idle", f"upstream sent nothing for {self._idle:g}s (idle_timeout_s)"
                ) from exc
            except httpx.TransportError as exc:
                raise UpstreamError(
                    "broken", f"upstream connection failed: {_describe(exc)}"
                ) from exc
            yield chunk

    def over_time(self) -> str:
        return f"the request ran past the slot's max_duration_s of {self._max_duration:g}s"

    async def aclose(self) -> None:
        await self._response.aclose()


class BoundedBody:
    """A body gathered up to a cap, decoded from gzip or deflate on the way."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.limit = limit
        wbits = _DECODED.get(encoding)
        self._inflate = zlib.decompressobj(wbits) if wbits is not None else None
        self.decoded = self._inflate is not None
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        if self._inflate is not None:
            try:
                # One byte past the room left is enough to know the cap is passed.
                chunk = self._inflate.decompress(chunk, self.limit - self._size + 1)
            except zlib.error as exc:
                raise UpstreamError(
                    "broken", f"the upstream's compressed body is bad: {exc}"
                ) from exc
        self._size += len(chunk)
        if self._size > self.limit:
            raise UpstreamError(
                "too_large", f"the upstream's answer is larger than {self.limit / 2**20:g} MB"
            )
        self._parts.append(chunk)

    def value(self) -> bytes:
        return b"".join(self._parts)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:300]


def upstream_url(slot: SlotEntry, path: str) -> str:
    return slot.url.rstrip("/") + "/" + path.lstrip("/")


def server_root(slot: SlotEntry) -> str:
    """The server's root: the API root without its trailing ``/v1`` (llama.cpp's /health)."""
    base = slot.url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


# Pool size: one connection per concurrent upstream request. Slots' own max_concurrency
# limits what they take; this only has to stay out of the way of thousands of held streams.
POOL_CONNECTIONS = 10_000
POOL_KEEPALIVE_S = 30.0


class _AiohttpStream(httpx.AsyncByteStream):
    """An aiohttp response body as httpx sees it: each read as it arrived, never re-chunked."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ServerTimeoutError as exc:
            self._response.close()  # a connection that failed mid-body is not reusable
            raise httpx.ReadTimeout(str(exc) or "read timed out") from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            self._response.close()
            raise httpx.ReadError(_cut_reason(exc)) from exc

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
    return _describe(exc)


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
        try:
            body = request.content
        except httpx.RequestNotRead:
            body = await request.aread()
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
            stream=_AiohttpStream(response),
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
        token = _sending.set(sent)
        try:
            return await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=_InMemoryBody(body) if body else None,
                allow_redirects=False,
                compress=False,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                ),
            )
        finally:
            _sending.reset(token)

    async def aclose(self) -> None:
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None


class Upstream:
    """One transport per event loop, sized for hundreds of concurrent streams.

    The seam is httpx's transport API (``httpx.Request`` in, ``httpx.Response`` out), called
    directly, without an ``httpx.AsyncClient`` around it. The client's extras are all wrong
    for a router: its cookie jar would keep a cookie one upstream answer sets and send it
    with every later request, whoever makes it; and its URL merging, auth and redirect
    flows and event hooks, features a proxy must not use, took about a tenth of the /v1
    path's CPU in a profile (docs/performance.md).
    """

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._given = transport
        self._transports: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, httpx.AsyncBaseTransport
        ] = weakref.WeakKeyDictionary()

    def use_transport(self, transport: httpx.AsyncBaseTransport | None) -> None:
        """Swap the transport (tests use httpx.MockTransport here); drops pooled ones."""
        self._given = transport
        self._transports = weakref.WeakKeyDictionary()

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        loop = asyncio.get_running_loop()
        transport = self._transports.get(loop)
        if transport is None:
            # Tests put an httpx.MockTransport here; otherwise aiohttp's pool (see
            # AiohttpTransport), one per event loop: its connections belong to that loop.
            transport = self._given if self._given is not None else AiohttpTransport()
            self._transports[loop] = transport
        return transport

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        transport = self._transports.pop(loop, None)
        if transport is not None:
            await transport.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        # The response does not keep the request (httpx.AsyncClient would): once the upstream
        # has the body, a stream that runs for minutes has no use for it.
        return await self.transport.handle_async_request(request)

    async def open(
        self,
        slot: SlotEntry,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        method: str = "POST",
    ) -> UpstreamResponse:
        """Send a request and wait for the response headers (not the body)."""
        out = {k: v for k, v in headers.items() if k.lower() not in _NOT_UPSTREAM}
        out["accept-encoding"] = "identity"
        key = os.environ.get(slot.api_key_env) if slot.api_key_env else None
        if key:
            out["authorization"] = f"Bearer {key}"
        request = httpx.Request(
            method,
            upstream_url(slot, path),
            content=body,
            # As bytes: httpx encodes str values as ASCII and would fail on a client's UTF-8
            # text (its Headers then read the bytes back as UTF-8 for aiohttp, which writes
            # them as UTF-8 again: the upstream gets what the client sent).
            headers=[(k.encode("latin-1"), v.encode()) for k, v in out.items()],
            extensions={"timeout": {"connect": slot.connect_timeout_s}},
        )
        wait = slot.first_byte_timeout_s
        deadline: float | None = None
        if slot.max_duration_s > 0:
            # The cap runs from here, the moment the request goes to the slot: time spent
            # waiting for a place (HAL0_QUEUE_WAIT_S) or a model swap has its own limits.
            deadline = asyncio.get_running_loop().time() + slot.max_duration_s
            wait = min(wait, slot.max_duration_s)
        try:
            async with asyncio.timeout(wait):
                response = await self._send(request)
        except TimeoutError as exc:
            if wait < slot.first_byte_timeout_s:
                raise UpstreamError(
                    "timeout",
                    f"slot '{slot.name}': the request ran past its max_duration_s of "
                    f"{slot.max_duration_s:g}s before any answer",
                ) from exc
            raise UpstreamError(
                "timeout",
                f"slot '{slot.name}' sent no response within {slot.first_byte_timeout_s:g}s",
            ) from exc
        except httpx.ConnectTimeout as exc:
            raise UpstreamError(
                "timeout",
                f"could not connect to slot '{slot.name}' within {slot.connect_timeout_s:g}s",
            ) from exc
        except (
            httpx.ConnectError,
            httpx.RemoteProtocolError,
            httpx.ReadError,
            httpx.WriteError,
        ) as exc:
            raise UpstreamError(
                "unreachable",
                f"slot '{slot.name}' at {redact.masked(slot.url)} is unreachable: {_describe(exc)}",
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamError("unreachable", f"slot '{slot.name}': {_describe(exc)}") from exc
        return UpstreamResponse(response, slot.idle_timeout_s, deadline, slot.max_duration_s)

    async def probe(
        self, url: str, timeout: float, limit: int, api_key_env: str = ""
    ) -> ProbeResult:
        """GET ``url`` for a health probe: status and parsed JSON (at most ``limit`` bytes of
        it, decoded), never an exception."""
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        try:
            async with asyncio.timeout(timeout):
                response = await self._send(httpx.Request("GET", url, headers=headers))
                content = BoundedBody(response.headers.get("content-encoding", "").lower(), limit)
                try:
                    async for chunk in response.aiter_raw():
                        content.add(chunk)
                finally:
                    await response.aclose()
        except TimeoutError:
            return ProbeResult(None, None, f"no answer within {timeout:g}s", timed_out=True)
        except httpx.HTTPError as exc:
            return ProbeResult(None, None, _describe(exc))
        except UpstreamError as exc:
            return ProbeResult(response.status_code, None, exc.message)
        raw = content.value()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        error = "" if response.is_success else raw[:300].decode("utf-8", "replace")
        return ProbeResult(response.status_code, body, error)


upstream = Upstream()
