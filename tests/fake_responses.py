"""The fake upstream's Responses API (``/v1/responses``), as OpenAI documents it: stateful, so
the fake keeps the responses it made (``fake.responses``) and what each was given
(``fake.inputs``), and a later request about an id another server made is a 404."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tests.fake_wire import Call, end_stream, send_json, send_part, sse, start_stream

if TYPE_CHECKING:
    from tests.fakes import FakeUpstream


def _made(fake: FakeUpstream, req: dict[str, Any], status: str) -> dict[str, Any]:
    rid = f"resp_{fake.name}_{next(fake.ids)}"
    text = f"hello from {fake.name}"
    previous = req.get("previous_response_id")
    if previous:
        text += f" (after {previous})"
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": req.get("model"),
        "previous_response_id": previous,
        "output": [
            {
                "type": "message",
                "id": f"msg_{rid}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
        "metadata": {"slot": fake.name},
    }


def _error(message: str, param: str | None, code: str) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


async def responses(fake: FakeUpstream, call: Call) -> None:
    parts = call.path.split("/")  # "", "v1", "responses", id?, action?
    if len(parts) == 3 and call.method == "POST":
        return await _create(fake, call)
    if parts[3:] == ["compact"] and call.method == "POST":
        return await _compact(fake, call)
    rid = parts[3] if len(parts) > 3 else ""
    found = fake.responses.get(rid)
    if found is None:
        message = f"No response with id '{rid}' on {fake.name}."
        return await send_json(call.send, 404, _error(message, None, "not_found"))
    action = (call.method, parts[4:])
    if action == ("GET", []):
        return await send_json(call.send, 200, found, fake.tag)
    if action == ("DELETE", []):
        del fake.responses[rid]
        gone = {"id": rid, "object": "response.deleted", "deleted": True}
        return await send_json(call.send, 200, gone, fake.tag)
    if action == ("GET", ["input_items"]):
        items = fake.inputs.get(rid, [])
        listed = {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
        return await send_json(call.send, 200, listed, fake.tag)
    if action == ("POST", ["cancel"]):
        found["status"] = "cancelled"
        return await send_json(call.send, 200, found, fake.tag)
    await send_json(call.send, 405, {"error": {"message": "no"}})


async def _compact(fake: FakeUpstream, call: Call) -> None:
    """``POST /v1/responses/compact``: the conversation's user messages kept, the rest
    folded into one compaction item (opaque to the client), as OpenAI documents it."""
    req = call.json
    given = req.get("input")
    items = (
        [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else given
    )
    kept = [i for i in items or [] if isinstance(i, dict) and i.get("role") == "user"]
    done = {
        "id": f"resp_{fake.name}_{next(fake.ids)}",
        "object": "response.compaction",
        "created_at": int(time.time()),
        "output": [
            *kept,
            {"type": "compaction", "id": f"cmp_{fake.name}", "encrypted_content": fake.name},
        ],
        "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4},
    }
    await send_json(call.send, 200, done, fake.tag)


async def _create(fake: FakeUpstream, call: Call) -> None:
    req = call.json
    if "model" not in req:  # as OpenAI's API refuses it (and hal0web's question is)
        error = _error(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
        return await send_json(call.send, 400, error)
    previous = req.get("previous_response_id")
    if previous and previous not in fake.responses:
        message = f"Previous response with id '{previous}' not found."
        error = _error(message, "previous_response_id", "previous_response_not_found")
        return await send_json(call.send, 404, error)
    done = _made(fake, req, "completed")
    fake.responses[done["id"]] = done
    fake.inputs[done["id"]] = [
        {
            "id": f"in_{done['id']}",
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": str(req.get("input"))}],
        }
    ]
    if req.get("stream"):
        return await _stream(fake, done, call)
    await send_json(call.send, 200, done, fake.tag)


def _events(done: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The documented event sequence of one streamed response with one text message."""
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    item = done["output"][0]
    text = item["content"][0]["text"]
    at = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    return [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        ),
        (
            "response.content_part.added",
            {**at, "part": {"type": "output_text", "text": "", "annotations": []}},
        ),
        *(
            ("response.output_text.delta", {**at, "delta": piece, "logprobs": []})
            for piece in (text[: len(text) // 2], text[len(text) // 2 :])
        ),
        ("response.output_text.done", {**at, "text": text, "logprobs": []}),
        ("response.content_part.done", {**at, "part": item["content"][0]}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": done}),
    ]


async def _stream(fake: FakeUpstream, done: dict[str, Any], call: Call) -> None:
    await start_stream(call.send, b"text/event-stream", fake.tag)
    for number, (kind, data) in enumerate(_events(done)):
        await send_part(call.send, sse(kind, {"type": kind, "sequence_number": number, **data}))
    await end_stream(call.send)
