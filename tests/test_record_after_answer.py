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


def test_a_recorded_decision_keeps_no_log_form(monkeypatch, caplog) -> None:
    """The log line's and the page's form of a decision is built for them and let go after:
    a record queued for the request log (thousands while the database is away) holds only
    its own fields."""
    taken: list[dict[str, object]] = []
    monkeypatch.setattr(
        decisions, "outputs", [decisions.log_output, lambda rec: taken.append(rec.data())]
    )
    rec = decisions.DecisionRecord.arrived("r1", "chat/completions")
    rec.model = "m"
    with caplog.at_level("INFO", logger=decisions.log.name):
        decisions._output(rec)
    assert taken and taken[0]["request_id"] == "r1"
    assert any('"request_id":"r1"' in r.getMessage() for r in caplog.records)
    assert rec._data is None
