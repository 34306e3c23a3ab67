"""The models-on-demand benchmark's parts (issue 21) count what they claim to count.

No timing is asserted: only that the fake's llama.cpp-router face reads, through hal0web's
own kind, as a router with its model loaded (what `python -m bench commits` relies on for
its loads slot), that the router's events are counted as loads once each, that errors are
said in a few words, and that the what-if's unload call returns only once the router lists
the model unloaded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from bench import models, router
from bench.fake import MODEL, FakeProtocol
from dispatch import kinds
from dispatch.routing import states


@pytest.fixture
async def fake_base() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


async def _json(http: aiohttp.ClientSession, url: str) -> object:
    async with http.get(url) as resp:
        assert resp.status == 200
        return orjson.loads(await resp.read())


async def test_the_fakes_router_face_reads_as_a_router_with_its_model_loaded(
    fake_base: str,
) -> None:
    kind = kinds.get("llamacpp")
    async with aiohttp.ClientSession() as http:
        listing = await _json(http, fake_base + "/router/v1/models")
        props = await _json(http, fake_base + "/router/props")
        plain = await _json(http, fake_base + "/v1/models")
    said = kind.read_loads(listing, None, props)
    assert said is not None
    assert said.loads_models and said.model_limit == 1
    assert {m: load.state for m, load in said.models.items()} == {MODEL: states.LOADED}
    # The plain face stays a server that lists its one model, no load states.
    assert kind.read_loads(plain, None, None) is None


async def test_the_fakes_router_event_stream_opens_and_stays_quiet(fake_base: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(fake_base + "/router/models/sse") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"] == "text/event-stream"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readline(), 0.3)


# As llama.cpp's router sent them (its /models/sse) for an unload of gemma and a load of
# smollm2: one `model_status` and several `status_change` per load.
ROUTER_EVENTS = [
    {"model": "gemma", "event": "status_change", "data": {"status": "unloaded", "exit_code": 0}},
    {"model": "smollm2", "event": "model_status", "data": {"status": "loading"}},
    {
        "model": "smollm2",
        "event": "status_change",
        "data": {"status": "loading", "progress": {"value": 0.0}},
    },
    {
        "model": "smollm2",
        "event": "status_change",
        "data": {"status": "loading", "progress": {"value": 1.0}},
    },
    {"model": "smollm2", "event": "status_change", "data": {"status": "loaded", "info": {}}},
]


def test_the_routers_events_count_each_load_once() -> None:
    count = router.LoadCount()
    began = time.perf_counter()
    for event in ROUTER_EVENTS:
        count._heard(event)
    assert dict(count.loads) == {"smollm2": 1}
    span = count.load_between("smollm2", began, time.perf_counter())
    assert span is not None and span[0] <= span[1]
    for event in [
        {"model": "smollm2", "event": "status_change", "data": {"status": "unloaded"}},
        *ROUTER_EVENTS[1:],
    ]:
        count._heard(event)
    assert dict(count.loads) == {"smollm2": 2}
    assert count.load_between("gemma", began, time.perf_counter()) is None


def test_an_error_is_said_in_a_few_words() -> None:
    body = (
        b'{"error":{"message":"Slot \'p\' could not load \'g\': 500","code":"model_load_failed"}}'
    )
    assert models._said(502, body) == "502 model_load_failed: Slot 'p' could not load 'g': 500"
    assert models._said(200, body).startswith("in stream model_load_failed: ")
    assert models._said(500, b"proxy error") == "500: proxy error"
