"""The ASGI plumbing under the fake upstream (tests/fakes.py): reading a request, and writing
JSON, bytes and server-sent events back, as small functions its endpoints share."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


@dataclass
class Seen:
    """One request as the fake received it: its path (with the query string, if any)."""

    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Call:
    """One request to a fake endpoint, and the channel to answer it on."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    receive: Receive
    send: Send

    @property
    def json(self) -> Any:
        return json.loads(self.body)


async def read_request(scope: dict[str, Any], receive: Receive, send: Send) -> bytes | None:
    """A fake server's start: its lifespan answered (None), or the request's whole body."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return None
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def send_bytes(
    send: Send, status: int, body: bytes, content_type: bytes, extra: Headers | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, data: Any, extra: Headers | None = None) -> None:
    await send_bytes(send, status, json.dumps(data).encode(), b"application/json", extra)


async def start_stream(send: Send, content_type: bytes, extra: Headers) -> None:
    """The head of a streamed answer (no length: the body ends when the fake says so)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", content_type), *extra],
        }
    )


async def send_part(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def end_stream(send: Send, body: bytes = b"") -> None:
    await send({"type": "http.response.body", "body": body, "more_body": False})


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event: ``event:`` (when named) and one ``data:`` line of JSON."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


@dataclass
class Form:
    """A multipart/form-data body as the fake read it (with the standard library's parser)."""

    fields: dict[str, str]
    files: dict[str, tuple[str, bytes, str]]  # field -> (filename, content, content type)


def parse_form(content_type: str, body: bytes) -> Form:
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes, str]] = {}
    for part in message.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, payload, part.get_content_type())
        else:
            fields[name] = payload.decode()
    return Form(fields, files)
