"""How a /v1 answer is built and sent (issue 23): ``Answer`` and the relay's streams are
Django responses made for less, whose headers say what Django's would; a whole body goes
out with its Content-Length, not chunked."""

from __future__ import annotations

import http.client
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from django.http import BadHeaderError, HttpResponse, StreamingHttpResponse
from django.http.response import ResponseHeaders

from dispatch.api.relay import _Relayed
from dispatch.api.responses import Answer
from dispatch.api.runtime import api_asgi_application

# Header values of every kind Django takes: the short way's (plain ASCII) and Django's own
# (a tab, Latin-1, past Latin-1, bytes, an int, a str subclass).
VALUES: list[Any] = [
    "bench",
    "",
    "a\tb",
    "café",
    "ünï €",
    b"raw",
    42,
    type("Named", (str,), {})("sub"),
]


def _same_as_django(ours: Any, django: Any) -> None:
    """Every attribute Django's constructor sets, set alike; the headers a ``Headers``."""
    assert vars(ours).keys() == vars(django).keys()
    for name, value in vars(django).items():
        if name == "headers":
            assert isinstance(ours.headers, ResponseHeaders)
            assert ours.headers._store == value._store
        elif name == "_iterator":
            continue  # (the same iterator given to each: compared by the caller)
        else:
            assert vars(ours)[name] == value, name


@pytest.mark.parametrize(
    ("content", "status", "content_type"),
    [(b'{"a":1}', 201, "application/json"), (b"", 200, None), (b"x", 599, "text/plain")],
)
def test_an_answer_is_what_django_makes(
    content: bytes, status: int, content_type: str | None
) -> None:
    ours = Answer(content, status, content_type)
    django = HttpResponse(content, status=status, content_type=content_type)
    assert isinstance(ours, HttpResponse)
    _same_as_django(ours, django)
    assert ours.content == django.content and ours.charset == django.charset
    assert ours.serialize() == django.serialize()


def test_a_relayed_stream_is_what_django_makes() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    body = parts()
    ours = _Relayed(body, 200, "text/event-stream")
    django = StreamingHttpResponse(body, status=200, content_type="text/event-stream")
    assert isinstance(ours, StreamingHttpResponse)
    _same_as_django(ours, django)
    assert vars(ours)["_iterator"] is vars(django)["_iterator"] is body
    assert ours.streaming_content is body


@pytest.mark.parametrize("status", [99, 600])
def test_a_status_django_refuses_is_refused(status: int) -> None:
    with pytest.raises(ValueError, match="from 100 to 599"):
        HttpResponse(status=status)
    with pytest.raises(ValueError, match="from 100 to 599"):
        Answer(b"", status)


@pytest.mark.parametrize("value", VALUES)
def test_a_header_is_stored_as_django_stores_it(value: Any) -> None:
    ours, django = Answer(b""), HttpResponse(b"")
    ours["X-Hal0-Slot"] = django["X-Hal0-Slot"] = value
    ours.headers["X-Other"] = django.headers["X-Other"] = value
    assert ours.headers._store == django.headers._store
    assert ours["x-hal0-slot"] == django["x-hal0-slot"]


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "\r\nX-Injected: 1", b"a\nb", "é\nb"])
def test_a_line_break_is_refused_in_a_value_and_a_name(bad: Any) -> None:
    for response in (Answer(b""), HttpResponse(b"")):
        with pytest.raises(BadHeaderError):
            response["X-Hal0-Slot"] = bad
        if isinstance(bad, str):
            with pytest.raises(BadHeaderError):
                response[f"X-{bad}"] = "1"
        assert "x-hal0-slot" not in response.headers._store


def test_a_name_outside_ascii_is_refused_as_django_refuses_it() -> None:
    for response in (Answer(b""), HttpResponse(b"")):
        with pytest.raises(UnicodeError, match="must be in ascii"):
            response["X-Café"] = "1"


# --- sending: the handler's send_response -------------------------------------------------


async def _sent(response: Any) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    sent: list[Mapping[str, Any]] = []

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)

    await api_asgi_application().send_response(response, send)
    headers: dict[bytes, list[bytes]] = {}
    for name, value in sent[0]["headers"]:
        headers.setdefault(name.lower(), []).append(value)
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("make", [Answer, HttpResponse])
async def test_a_whole_body_says_its_length(make: Any) -> None:
    status, headers, body = await _sent(make(b'{"ok":true}'))
    assert status == 200 and body == b'{"ok":true}'
    assert headers[b"content-length"] == [b"11"]


async def test_an_empty_body_says_length_zero() -> None:
    _, headers, _ = await _sent(Answer(b"", 200))
    assert headers[b"content-length"] == [b"0"]


@pytest.mark.parametrize("status", [204, 304])
async def test_no_length_where_there_is_no_body_to_say(status: int) -> None:
    _, headers, body = await _sent(HttpResponse(status=status))
    assert b"content-length" not in headers and body == b""


async def test_a_length_already_said_is_not_said_twice() -> None:
    response = HttpResponse(b"abc")
    response["Content-Length"] = "3"
    _, headers, _ = await _sent(response)
    assert headers[b"content-length"] == [b"3"]


async def test_a_stream_says_no_length() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    _, headers, body = await _sent(_Relayed(parts(), 200, "text/event-stream"))
    assert b"content-length" not in headers and body == b"data: 1\n\n"


async def test_cookies_still_go_out() -> None:
    response = Answer(b"x")
    response.set_cookie("k", "v")
    _, headers, _ = await _sent(response)
    assert headers[b"set-cookie"] == [b"k=v; Path=/"]


# --- over HTTP: hal0web under Uvicorn, a fake upstream behind -----------------------------

CHAT = {"model": "hermes", "messages": [{"role": "user", "content": "hi"}]}


def _exchange(
    url: str, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[http.client.HTTPResponse, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def _framed_by_length(response: http.client.HTTPResponse, body: bytes) -> None:
    assert response.getheader("Transfer-Encoding") is None
    assert response.getheader("Content-Length") == str(len(body))
    assert len(response.headers.get_all("Content-Length") or []) == 1


def test_a_proxied_answer_goes_out_with_its_length(seed_slots: Any, hal0: Any) -> None:
    response, body = _exchange(hal0.url, "POST", "/v1/chat/completions", CHAT)
    assert response.status == 200 and json.loads(body)["object"] == "chat.completion"
    _framed_by_length(response, body)
    assert response.getheader("X-Hal0-Slot") == "agent-hermes"
    assert response.getheader("X-Content-Type-Options") == "nosniff"


def test_an_answer_of_hal0webs_own_goes_out_with_its_length(seed_slots: Any, hal0: Any) -> None:
    response, body = _exchange(hal0.url, "POST", "/v1/chat/completions", {**CHAT, "model": "x"})
    assert response.status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
    _framed_by_length(response, body)
    assert response.getheader("X-Hal0-Error") == "1"


def test_head_says_the_length_get_would_have(seed_slots: Any, hal0: Any) -> None:
    got, got_body = _exchange(hal0.url, "GET", "/v1/chat/completions")
    head, head_body = _exchange(hal0.url, "HEAD", "/v1/chat/completions")
    assert got.status == head.status == 405 and got_body and head_body == b""
    assert head.getheader("Transfer-Encoding") is None
    assert head.getheader("Content-Length") == str(len(got_body))


def test_no_content_says_no_length(seed_slots: Any, hal0: Any) -> None:
    response, body = _exchange(hal0.url, "OPTIONS", "/v1/chat/completions")
    assert response.status == 204 and body == b""
    assert response.getheader("Content-Length") is None
    assert response.getheader("Transfer-Encoding") is None
