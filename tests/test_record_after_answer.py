"""What only a log or a page needs is done after the answer has gone out (issue 23)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from dispatch.observability import decisions

pytestmark = pytest.mark.django_db(transaction=True)


async def test_the_decision_is_recorded_after_the_answer_is_sent(monkeypatch) -> None:
    from dispatch.api.runtime import api_asgi_application

    app = api_asgi_application()
    sent: list[str] = []
    seen_when_recorded: list[list[str]] = []

    def output(rec: decisions.DecisionRecord) -> None:
        seen_when_recorded.append(list(sent))

    monkeypatch.setattr(decisions, "outputs", [output])  # this one alone: no rows, no lines
    body = b'{"model": "no-such-model", "messages": []}'
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message["type"])

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    assert sent == ["http.response.start", "http.response.body"]  # the 404, whole
    assert seen_when_recorded == []  # not yet: the loop's next turn
    await asyncio.sleep(0)  # one turn of the loop
    assert seen_when_recorded == [["http.response.start", "http.response.body"]]
