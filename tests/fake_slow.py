"""A chat server whose answers take as long as each request asks (its ``x-events`` header: one
event every ``GAP_S``): what a server that stops has in flight. Each stream event is written
in two halves with the wait between them, so a stream cut at any moment is cut inside an
event. Every other path is a FastAPI-like 404 (no route), as hal0web's discovery expects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.fake_wire import Receive, Send, end_stream, read_request, send_json, send_part
from tests.fake_wire import start_stream as start

GAP_S = 0.1
MODEL = "slow"


def manifest(name: str, url: str) -> str:
    """A slot on this server that speaks chat completions only: Anthropic's Messages and
    Ollama's chat reach it translated, streams included."""
    return (
        f'name = "{name}"\nurl = "{url}/v1"\nkind = "openai"\n'
        f'endpoints = ["chat/completions"]\n\n[model]\ndefault = "{MODEL}"\n'
    )


def _chunk(i: int, finish: str | None = None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": f"w{i} "} if finish is None else {}
    return {
        "id": "chatcmpl-slow",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


class SlowChat:
    """The ASGI app. ``streams``: streams begun; ``ended``: streams it sent to the end."""

    def __init__(self) -> None:
        self.streams = 0
        self.ended = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        path = scope["path"]
        if path == "/v1/models":
            listed = [{"id": MODEL, "object": "model", "owned_by": "slow"}]
            return await send_json(send, 200, {"object": "list", "data": listed})
        if path != "/v1/chat/completions":
            return await send_json(send, 404, {"detail": "Not Found"})
        events = int(dict(scope["headers"]).get(b"x-events", b"3"))
        if not json.loads(body).get("stream"):
            await asyncio.sleep(events * GAP_S)
            message = {"role": "assistant", "content": "done"}
            answer = {
                "id": "chatcmpl-slow",
                "object": "chat.completion",
                "created": 0,
                "model": MODEL,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            return await send_json(send, 200, answer)
        await start(send, b"text/event-stream", [])
        self.streams += 1
        gone = asyncio.ensure_future(receive())  # after the body, only http.disconnect comes
        try:
            for i in range(events):
                event = _event(_chunk(i))
                await send_part(send, event[: len(event) // 2])
                await asyncio.wait((gone,), timeout=GAP_S)
                if gone.done():
                    return  # the client (hal0web) closed the stream
                await send_part(send, event[len(event) // 2 :])
            await send_part(send, _event(_chunk(events, "stop")))
            await end_stream(send, b"data: [DONE]\n\n")
            self.ended += 1
        finally:
            gone.cancel()
