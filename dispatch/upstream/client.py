"""The one seam to upstream servers, and the only place that sends to them.

Requests are opened here and their bodies streamed back raw; health probes use the same
transport. Callers see ``UpstreamResponse`` and ``UpstreamError`` (``dispatch.upstream.response``),
never httpx, so the transport behind the seam (``dispatch.upstream.pool``; the performance
issue chose it by measurement) can change without touching them.
"""

from __future__ import annotations

import asyncio
import json
import os
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from dispatch.kinds.urls import upstream_url
from dispatch.lib import json_reader, redact
from dispatch.routing.table import SlotEntry
from dispatch.upstream.headers import for_upstream
from dispatch.upstream.pool import HEADERS_TEXT, URL_TEXT, AiohttpTransport, describe
from dispatch.upstream.response import BoundedBody, Timer, UpstreamError, UpstreamResponse

# Each slot's URLs, parsed once: httpx parses a URL string on every request otherwise (a
# tenth of the path's instructions, bench/served.py). The text rides along in the request's
# extensions for the transport, which would otherwise render the URL back to text each time.
_URLS: dict[tuple[str, str], tuple[httpx.URL, str]] = {}
_URLS_LIMIT = 4096  # slots x paths; cleared past it (slot URLs change rarely)


def _url(slot: SlotEntry, path: str) -> tuple[httpx.URL, str]:
    key = (slot.url, path)
    found = _URLS.get(key)
    if found is None:
        if len(_URLS) >= _URLS_LIMIT:
            _URLS.clear()
        text = upstream_url(slot, path)
        found = _URLS[key] = (httpx.URL(text), text)
    return found


@dataclass(frozen=True, slots=True)
class ProbeResult:
    status: int | None  # None: no HTTP answer at all
    body: Any  # parsed JSON, or None
    error: str = ""
    timed_out: bool = False  # connected (or tried to) but no answer in time: slow, not gone


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
        out = for_upstream(headers)
        out["accept-encoding"] = "identity"
        key = os.environ.get(slot.api_key_env) if slot.api_key_env else None
        if key:
            out["authorization"] = f"Bearer {key}"
        transport = self.transport
        url, text = _url(slot, path)
        extensions: dict[str, Any] = {
            "timeout": {"connect": slot.connect_timeout_s},
            URL_TEXT: text,
        }
        sent: list[tuple[bytes, bytes]] | None = None
        if isinstance(transport, AiohttpTransport):
            # Ours takes them as text, as aiohttp does, and only so (the request's own
            # headers stay empty): encoded to bytes for httpx's Headers and decoded back for
            # aiohttp, they cost ~30,000 instructions a request (bench/served.py's chat).
            extensions[HEADERS_TEXT] = [(k.lower(), v) for k, v in out.items()]
        else:
            # As bytes: httpx encodes str values as ASCII and would fail on a client's UTF-8
            # text (any transport then reads the same bytes: the upstream gets what the
            # client sent).
            sent = [(k.encode("latin-1"), v.encode()) for k, v in out.items()]
        request = httpx.Request(
            method,
            url,
            headers=sent,
            # A stream given, not content: httpx would otherwise rebuild the headers to add
            # Host and Content-Length, which the transport computes itself when it sends.
            stream=httpx.ByteStream(body),
            extensions=extensions,
        )
        if sent is not None:
            # Any other transport may read ``request.content`` as a request made with content
            # has it, without reading the stream first: in memory already, so no cost to say.
            request.read()
        loop = asyncio.get_running_loop()
        timer = Timer(loop)  # this wait's, then the body's (UpstreamResponse.chunks)
        start = loop.time()
        wait = slot.first_byte_timeout_s
        deadline: float | None = None
        if slot.max_duration_s > 0:
            # The cap runs from here, the moment the request goes to the slot: time spent
            # waiting for a place (HAL0_QUEUE_WAIT_S) or a model swap has its own limits.
            deadline = start + slot.max_duration_s
            wait = min(wait, slot.max_duration_s)
        timer.begin()
        timer.set(start + wait)
        try:
            try:
                # Not through _send: the transport is at hand already.
                response = await transport.handle_async_request(request)
            finally:
                timed_out = timer.end()
        except asyncio.CancelledError as exc:
            if not timed_out:
                raise  # a cancel from outside (the client went away): not a timeout
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
                f"slot '{slot.name}' at {redact.masked(slot.url)} is unreachable: {describe(exc)}",
                # Refused (a dead server's port), or no such host: no connection was made.
                connected=not isinstance(exc, httpx.ConnectError),
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamError("unreachable", f"slot '{slot.name}': {describe(exc)}") from exc
        return UpstreamResponse(response, slot.idle_timeout_s, deadline, slot.max_duration_s, timer)

    async def probe(
        self, url: str, timeout: float, limit: int, api_key_env: str = ""
    ) -> ProbeResult:
        """GET ``url`` for a health probe: status and parsed JSON (at most ``limit`` bytes of
        it, decoded), never an exception."""
        return await self.ask("GET", url, None, timeout, limit, api_key_env)

    async def ask(
        self,
        method: str,
        url: str,
        body: object,
        timeout: float,
        limit: int,
        api_key_env: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> ProbeResult:
        """One request of hal0web's own to a server (a probe, a model load or unload): status
        and parsed JSON (at most ``limit`` bytes of it, decoded), never an exception.
        ``body``, when not None, is sent as JSON; ``headers`` are added to hal0web's."""
        sent = {"accept": "application/json", "accept-encoding": "identity", **(headers or {})}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            sent["authorization"] = f"Bearer {key}"
        content = None
        if body is not None:
            content = json.dumps(body).encode()
            sent["content-type"] = "application/json"
        try:
            async with asyncio.timeout(timeout):
                request = httpx.Request(method, url, headers=sent, content=content)
                response = await self._send(request)
                answer = BoundedBody(response.headers.get("content-encoding", "").lower(), limit)
                try:
                    async for chunk in response.aiter_raw():
                        answer.add(chunk)
                finally:
                    await response.aclose()
        except TimeoutError:
            return ProbeResult(None, None, f"no answer within {timeout:g}s", timed_out=True)
        except httpx.HTTPError as exc:
            return ProbeResult(None, None, describe(exc))
        except UpstreamError as exc:
            return ProbeResult(response.status_code, None, exc.message)
        raw = answer.value()
        try:
            parsed = json_reader.loads(raw)  # bounded: a deep answer is no RecursionError
        except ValueError:
            parsed = None
        error = "" if response.is_success else raw[:300].decode("utf-8", "replace")
        return ProbeResult(response.status_code, parsed, error)

    async def events(
        self, url: str, api_key_env: str = "", connect_timeout: float = 5.0
    ) -> AsyncIterator[tuple[str, Any]]:
        """A server's Server-Sent Events stream (its pushed model states): each event as
        (its ``event:`` name or "", its ``data:`` parsed as JSON, None when not JSON), for as
        long as the server keeps the stream open. Connection failures raise httpx's errors."""
        headers = {"accept": "text/event-stream", "accept-encoding": "identity"}
        key = os.environ.get(api_key_env) if api_key_env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        request = httpx.Request(
            "GET", url, headers=headers, extensions={"timeout": {"connect": connect_timeout}}
        )
        async with asyncio.timeout(connect_timeout):
            response = await self._send(request)
        try:
            if response.status_code != 200:
                raise httpx.HTTPStatusError(
                    f"{url} answered {response.status_code}", request=request, response=response
                )
            pending = b""
            name, data = "", []
            async for chunk in response.aiter_raw():
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.rstrip(b"\r").decode("utf-8", "replace")
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        try:
                            parsed = json_reader.loads("\n".join(data))
                        except ValueError:
                            parsed = None
                        yield name, parsed
                        name, data = "", []
        finally:
            await response.aclose()


upstream = Upstream()
