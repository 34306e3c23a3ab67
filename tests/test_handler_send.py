"""How the /v1 handler sends an answer: parts as they come, never re-chunked (issue 23)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from django.http import HttpResponse, StreamingHttpResponse

from dispatch.api.runtime import api_asgi_application

BIG = b"x" * 100_000  # past Django's 64 KB chunk size


async def _sent(response: Any) -> list[Mapping[str, Any]]:
    sent: list[Mapping[str, Any]] = []

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    await api_asgi_application().send_response(response, send)
    return sent


async def test_a_stream_goes_out_part_by_part_as_the_relay_yields_it() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield BIG

    sent = await _sent(StreamingHttpResponse(parts(), content_type="text/event-stream"))
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", BIG, None]


async def test_a_whole_body_goes_in_one_message() -> None:
    sent = await _sent(HttpResponse(BIG))
    assert sent[0]["status"] == 200 and [m["body"] for m in sent[1:]] == [BIG]


async def test_a_stream_from_a_sync_iterator_still_goes_out() -> None:
    with pytest.warns(Warning, match="synchronous iterators"):
        sent = await _sent(StreamingHttpResponse(iter([b"a", b"b"])))
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"ab"
