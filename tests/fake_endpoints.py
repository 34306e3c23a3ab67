"""The fake upstream's endpoints beyond chat and the Responses API: Anthropic Messages, audio,
images and rerank, each as its documentation describes it.

Every answer carries the server's name (a field, the ``x-upstream-slot`` header, or in the
bytes), so a test can tell which server answered.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import TYPE_CHECKING, Any

from tests.fake_wire import (
    Call,
    end_stream,
    parse_form,
    send_bytes,
    send_json,
    send_part,
    sse,
    start_stream,
)

if TYPE_CHECKING:
    from tests.fakes import FakeUpstream

SPEECH_CHUNKS = 3
RERANK_PATHS = ("/v1/rerank", "/v1/reranking", "/rerank")


# --- Anthropic Messages ----------------------------------------------------------------------


async def messages(fake: FakeUpstream, call: Call) -> None:
    req = call.json
    if "model" not in req:  # as Anthropic's API refuses it (and hal0web's question is)
        error = {"type": "invalid_request_error", "message": "model: Field required"}
        return await send_json(call.send, 400, {"type": "error", "error": error})
    message = {
        "id": f"msg_{fake.name}_{next(fake.ids)}",
        "type": "message",
        "role": "assistant",
        "model": req.get("model"),
        "content": [{"type": "text", "text": f"hello from {fake.name}"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 4},
    }
    if not req.get("stream"):
        return await send_json(call.send, 200, message, fake.tag)
    await start_stream(call.send, b"text/event-stream; charset=utf-8", fake.tag)
    for kind, data in _message_events(fake, message):
        await send_part(call.send, sse(kind, {"type": kind, **data}))
    await end_stream(call.send)


def _message_events(
    fake: FakeUpstream, message: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """The documented event sequence of one streamed message with one text block."""
    opening = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
    return [
        ("message_start", {"message": opening}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("ping", {}),
        *(
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece}})
            for piece in ("hello ", f"from {fake.name}")
        ),
        ("content_block_stop", {"index": 0}),
        (
            "message_delta",
            {
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 4},
            },
        ),
        ("message_stop", {}),
    ]


async def count_tokens(fake: FakeUpstream, call: Call) -> None:
    words = sum(len(str(m.get("content", "")).split()) for m in call.json.get("messages", []))
    await send_json(call.send, 200, {"input_tokens": words, "slot": fake.name}, fake.tag)


# --- rerank, audio, images -------------------------------------------------------------------


async def rerank(fake: FakeUpstream, call: Call) -> None:
    req = call.json
    docs = req.get("documents", [])
    results = [{"index": i, "relevance_score": round(1.0 / (i + 1), 3)} for i in range(len(docs))]
    answer = {
        "model": req.get("model"),
        "slot": fake.name,
        "path": call.path,
        "results": results,
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    await send_json(call.send, 200, answer, fake.tag)


async def transcribe(fake: FakeUpstream, call: Call) -> None:
    """Transcriptions and translations: what the fake heard, as JSON or as plain text."""
    form = parse_form(call.headers.get("content-type", ""), call.body)
    filename, content, _ = form.files["file"]
    text = f"{fake.name} heard {filename} ({len(content)} bytes) as {form.fields.get('model')}"
    if form.fields.get("response_format") == "text":
        plain = b"text/plain; charset=utf-8"
        return await send_bytes(call.send, 200, text.encode(), plain, fake.tag)
    await send_json(call.send, 200, {"text": text}, fake.tag)


async def speech(fake: FakeUpstream, call: Call) -> None:
    """Audio in a few pieces, each naming the server, voice and model."""
    req = call.json
    await start_stream(call.send, b"audio/mpeg", fake.tag)
    for i in range(SPEECH_CHUNKS):
        piece = f"ID3 {fake.name} {req.get('voice')} {req.get('model')} {i};".encode()
        await send_part(call.send, piece)
        await asyncio.sleep(0)
    await end_stream(call.send)


async def generate_image(fake: FakeUpstream, call: Call) -> None:
    req = call.json
    picture = f"{fake.name} drew {req.get('prompt')} as {req.get('model')}"
    await send_json(call.send, 200, _images(picture), fake.tag)


async def edit_image(fake: FakeUpstream, call: Call) -> None:
    """Edits and variations: the first image's name and size in the picture."""
    form = parse_form(call.headers.get("content-type", ""), call.body)
    files = [v for k, v in form.files.items() if k.startswith("image")]
    picture = (
        f"{fake.name} edited {files[0][0]} ({len(files[0][1])} bytes) as {form.fields.get('model')}"
    )
    await send_json(call.send, 200, _images(picture), fake.tag)


def _images(picture: str) -> dict[str, Any]:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(picture.encode()).decode()}],
    }
