"""The proxy's transport: aiohttp's pool behind httpx's API, over real loopback sockets.

The transport was chosen by measurement (docs/performance.md); these tests hold what the
rest of the proxy relies on: bodies pass as they arrive, errors keep their meaning
(refused is not a timeout), and an abandoned stream closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import cast

import httpx
import pytest

from dispatch.routing.table import ModelEntry, SlotEntry, make_slot
from dispatch.upstream.client import Upstream
from dispatch.upstream.pool import AiohttpTransport
from dispatch.upstream.response import UpstreamError
from tests.fakes import FakeUpstream, ServerThread, free_port
from tests.polling import await_until
from tests.raw_upstream import RawRequest, RawUpstream, http_response

BODY = b'{"model": "m1", "messages": []}'
STREAM_BODY = b'{"model": "m1", "stream": true, "messages": []}'


@pytest.fixture
def fake() -> Iterator[tuple[FakeUpstream, ServerThread]]:
    app = FakeUpstream("solo", models=["m1"])
    server = ServerThread(app).start()
    yield app, server
    server.stop()


@pytest.fixture
async def up() -> AsyncIterator[Upstream]:
    upstream = Upstream()
    yield upstream
    await upstream.aclose()


def _slot(url: str, **fields: object) -> SlotEntry:
    return make_slot("solo", url + "/v1", [ModelEntry("m1", "m1", "manifest")], **fields)


async def test_the_default_transport_is_aiohttps_pool(up: Upstream) -> None:
    assert isinstance(up.transport, AiohttpTransport)


async def test_use_transport_still_overrides_it() -> None:
    up = Upstream()
    up.use_transport(httpx.MockTransport(lambda r: httpx.Response(299, content=b"mocked")))
    response = await up.open(_slot("http://127.0.0.1:9"), "chat/completions", BODY, {})
    assert response.status_code == 299
    assert await response.read(2**26) == b"mocked"
    await up.aclose()


async def test_another_transport_reads_the_request_as_httpx_gives_it() -> None:
    """Not every transport reads the body's stream first, as MockTransport does: one that
    reads ``request.content`` (bench/inproc.py's) gets the body and the client's headers."""

    class Reading(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            echoed = request.content + b"|" + request.headers["x-title"].encode()
            return httpx.Response(200, content=echoed)

    up = Upstream(Reading())
    response = await up.open(
        _slot("http://127.0.0.1:9"), "chat/completions", BODY, {"X-Title": "café"}
    )
    assert await response.read(2**26) == BODY + "|café".encode()
    await up.aclose()


async def test_non_streaming_status_headers_and_body(fake, up: Upstream) -> None:
    app, server = fake
    response = await up.open(
        _slot(server.url), "chat/completions", BODY, {"content-type": "application/json"}
    )
    assert response.status_code == 200
    assert ("x-upstream-slot", "solo") in list(response.headers())
    assert b'"hello from solo"' in await response.read(2**26)
    assert app.requests[-1].body == BODY


async def test_the_clients_headers_reach_the_upstream_as_sent(
    fake, up: Upstream, monkeypatch
) -> None:
    # Given to aiohttp as text (not through httpx's Headers): a UTF-8 value still arrives as
    # the bytes the client sent, and what is hal0web's stays with hal0web.
    app, server = fake
    monkeypatch.setenv("SLOT_KEY_T", "sk-slot")
    headers = {
        "Content-Type": "application/json",
        "X-Title": "café ☕",
        "Authorization": "Bearer hal0-client-key",
        "Accept-Encoding": "gzip",
    }
    slot = _slot(server.url, api_key_env="SLOT_KEY_T")
    await (await up.open(slot, "chat/completions", BODY, headers)).read(2**26)
    seen = app.requests[-1].headers
    assert seen["x-title"] == "café ☕" and seen["content-type"] == "application/json"
    assert seen["authorization"] == "Bearer sk-slot" and seen["accept-encoding"] == "identity"


async def test_upstream_error_status_passes_through(fake, up: Upstream) -> None:
    app, server = fake
    app.fail_status = 418
    response = await up.open(_slot(server.url), "chat/completions", BODY, {})
    assert response.status_code == 418
    assert await response.read(2**26) == b'{"error": {"message": "solo says no"}}'


async def test_each_sse_event_arrives_as_its_own_chunk(fake, up: Upstream) -> None:
    app, server = fake
    app.chunks, app.chunk_gap_s = 4, 0.05
    response = await up.open(_slot(server.url), "chat/completions", STREAM_BODY, {})
    assert response.is_event_stream
    chunks = [chunk async for chunk in response.chunks()]
    # Nothing re-chunked or held back: one read per event the upstream sent, in order.
    assert [c.count(b"data: ") for c in chunks] == [1, 1, 1, 1, 1]
    assert chunks[-1] == b"data: [DONE]\n\n"


async def test_refused_connection_is_unreachable_not_timeout(up: Upstream) -> None:
    with pytest.raises(UpstreamError) as info:
        await up.open(_slot(f"http://127.0.0.1:{free_port()}"), "chat/completions", BODY, {})
    assert info.value.kind == "unreachable"


async def test_connection_cut_mid_stream_is_broken(fake, up: Upstream) -> None:
    app, server = fake
    app.chunks, app.break_after_chunks = 5, 2
    response = await up.open(_slot(server.url), "chat/completions", STREAM_BODY, {})
    got: list[bytes] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in response.chunks():
            got.append(chunk)
    assert info.value.kind == "broken"
    assert b"".join(got).count(b"data: ") == 2


async def test_abandoned_stream_closes_the_upstream_connection(fake, up: Upstream) -> None:
    app, server = fake
    app.chunks, app.chunk_gap_s = 200, 0.05
    response = await up.open(_slot(server.url), "chat/completions", STREAM_BODY, {})
    stream = cast(AsyncGenerator[bytes, None], response.chunks())
    await stream.__anext__()
    await stream.aclose()
    await response.aclose()
    # The fake runs in another thread: no Event to share, so poll.
    await await_until(lambda: app.disconnects, "the upstream to see the client go away", every=0.02)
    assert app.active == 0


async def test_connections_are_reused_between_requests(fake, up: Upstream) -> None:
    _, server = fake
    slot = _slot(server.url)
    for _ in range(3):
        response = await up.open(slot, "chat/completions", BODY, {})
        await response.read(2**26)
    transport = up.transport
    assert isinstance(transport, AiohttpTransport)
    session = transport._get_session()
    assert session.connector is not None
    # Three sequential requests, one pooled keep-alive connection to the upstream.
    assert sum(len(v) for v in session.connector._conns.values()) == 1


async def test_cookies_an_upstream_sets_are_not_kept_for_later_requests(fake, up: Upstream) -> None:
    app, server = fake
    app.set_cookie = "sid=user-a; Path=/"
    for _ in range(2):
        await (await up.open(_slot(server.url), "chat/completions", BODY, {})).read(2**26)
    assert [r.path for r in app.requests] == ["/v1/chat/completions"] * 2
    assert "cookie" not in app.requests[1].headers


# --- a buffered answer's body: what has come already is taken at once, the rest on the clock --

WHOLE = b'{"answer": "' + b"x" * 200 + b'"}'


def _in_two(gap_s: float, close: bool = False) -> RawUpstream:
    """An answer whose first half comes with its headers and the rest ``gap_s`` later (never,
    with ``close``: the connection is closed then instead)."""

    def behaviour(sock: socket.socket, request: RawRequest) -> bool:
        whole = http_response(200, WHOLE)
        sock.sendall(whole[: len(whole) - 100])
        time.sleep(gap_s)
        if close:
            return False
        sock.sendall(whole[len(whole) - 100 :])
        return True

    return RawUpstream(behaviour)


async def test_a_body_partly_come_is_read_whole_when_the_rest_comes(up: Upstream) -> None:
    server = _in_two(0.3)
    try:
        response = await up.open(
            _slot(server.url, idle_timeout_s=5.0), "chat/completions", BODY, {}
        )
        await asyncio.sleep(0.1)  # the first half is in
        assert await response.read(2**20) == WHOLE
    finally:
        server.stop()


async def test_a_body_that_stops_half_way_is_idle_after_the_idle_timeout(up: Upstream) -> None:
    server = _in_two(3.0)
    loop = asyncio.get_running_loop()
    try:
        response = await up.open(
            _slot(server.url, idle_timeout_s=0.3), "chat/completions", BODY, {}
        )
        await asyncio.sleep(0.1)
        started = loop.time()
        with pytest.raises(UpstreamError) as caught:
            await response.read(2**20)
        assert caught.value.kind == "idle"
        assert 0.25 <= loop.time() - started < 1.5
    finally:
        server.stop()


async def test_a_body_cut_before_it_is_read_is_broken(up: Upstream) -> None:
    server = _in_two(0.0, close=True)
    try:
        response = await up.open(_slot(server.url), "chat/completions", BODY, {})
        await asyncio.sleep(0.2)  # the half and the close are both in before the read
        with pytest.raises(UpstreamError) as caught:
            await response.read(2**20)
        assert caught.value.kind == "broken"
    finally:
        server.stop()


async def test_a_peeked_body_is_read_whole_and_in_order(fake, up: Upstream) -> None:
    _, server = fake
    response = await up.open(_slot(server.url), "chat/completions", BODY, {})
    head = await response.peek(8)
    body = await response.read(2**26)
    assert body.startswith(head) and b'"hello from solo"' in body


async def test_the_pool_sends_a_body_in_memory_or_streamed(fake) -> None:
    app, server = fake
    url = server.url + "/v1/chat/completions"

    class Streamed(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield BODY[:10]
            yield BODY[10:]

    transport = AiohttpTransport()
    try:
        for request in (
            httpx.Request("POST", url, content=BODY),
            httpx.Request("POST", url, stream=httpx.ByteStream(BODY)),  # as Upstream.open does
            httpx.Request("POST", url, stream=Streamed()),
        ):
            response = await transport.handle_async_request(request)
            await response.aread()
            assert response.status_code == 200 and app.requests[-1].body == BODY
    finally:
        await transport.aclose()
