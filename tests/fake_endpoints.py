"""A fake model server for every endpoint beyond chat: Responses, Anthropic Messages, audio,
images and rerank, each as its documentation describes it, over real loopback sockets.

Every answer is tagged with the server's name (a field, a header, or in the bytes), so a test
can tell which server answered; every request is kept (path, headers, raw body).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from typing import Any

from tests.fakes import Receive, Seen, Send, _json, read_request

SPEECH_CHUNKS = 3


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


def sse(event: str | None, data: Any) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


@dataclass
class EndpointUpstream:
    """An ASGI app serving every endpoint; ``name`` tags each answer."""

    name: str
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    requests: list[Seen] = field(default_factory=list)
    # The Responses API is stateful: the responses this server made, by id.
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))

    def seen(self, path: str) -> list[Seen]:
        return [s for s in self.requests if s.path == path]

    def calls(self) -> list[Seen]:
        """What it was asked, less the watcher's probes."""
        return [s for s in self.requests if s.path not in ("/health", "/v1/models")]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        query = scope.get("query_string", b"").decode()
        self.requests.append(Seen(path + (f"?{query}" if query else ""), headers, body))
        tag = [(b"x-upstream-slot", self.name.encode())]
        if path == "/health":
            return await _json(send, 200, {"status": "ok"})
        if path == "/v1/models":
            data = [
                {
                    "id": m,
                    "object": "model",
                    # llama.cpp's server answers the time of each request here.
                    "created": int(time.time() * 1000),
                    "owned_by": "llamacpp",
                    "context_length": 4096,
                    "capabilities": ["completion"],
                    "meta": {"n_ctx_train": 4096, "server": self.name},
                }
                for m in self.models
            ]
            return await _json(send, 200, {"object": "list", "data": data})
        if path.startswith("/v1/responses"):
            return await self._responses(method, path, body, send, tag)
        if path == "/v1/messages":
            return await self._messages(json.loads(body), send, tag)
        if path == "/v1/messages/count_tokens":
            req = json.loads(body)
            words = sum(len(str(m.get("content", "")).split()) for m in req.get("messages", []))
            return await _json(send, 200, {"input_tokens": words, "slot": self.name}, tag)
        if path in ("/v1/rerank", "/v1/reranking", "/rerank"):
            req = json.loads(body)
            docs = req.get("documents", [])
            results = [
                {"index": i, "relevance_score": round(1.0 / (i + 1), 3)} for i in range(len(docs))
            ]
            return await _json(
                send,
                200,
                {
                    "model": req.get("model"),
                    "slot": self.name,
                    "path": path,
                    "results": results,
                    "usage": {"prompt_tokens": 5, "total_tokens": 5},
                },
                tag,
            )
        if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            form = parse_form(headers.get("content-type", ""), body)
            filename, content, _ = form.files["file"]
            text = (
                f"{self.name} heard {filename} ({len(content)} bytes) as {form.fields.get('model')}"
            )
            if form.fields.get("response_format") == "text":
                return await _bytes(send, 200, text.encode(), b"text/plain; charset=utf-8", tag)
            return await _json(send, 200, {"text": text}, tag)
        if path == "/v1/audio/speech":
            req = json.loads(body)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"audio/mpeg"), *tag],
                }
            )
            for i in range(SPEECH_CHUNKS):
                piece = f"ID3 {self.name} {req.get('voice')} {req.get('model')} {i};".encode()
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                await asyncio.sleep(0)
            return await send({"type": "http.response.body", "body": b"", "more_body": False})
        if path == "/v1/images/generations":
            req = json.loads(body)
            picture = f"{self.name} drew {req.get('prompt')} as {req.get('model')}"
            return await _json(send, 200, _images(picture), tag)
        if path in ("/v1/images/edits", "/v1/images/variations"):
            form = parse_form(headers.get("content-type", ""), body)
            files = [v for k, v in form.files.items() if k.startswith("image")]
            picture = (
                f"{self.name} edited {files[0][0]} ({len(files[0][1])} bytes) "
                f"as {form.fields.get('model')}"
            )
            return await _json(send, 200, _images(picture), tag)
        await _json(send, 404, {"error": {"message": f"no route {path}"}})

    # --- the Responses API: the server keeps what it made ------------------------------------

    def _response(self, req: dict[str, Any], status: str) -> dict[str, Any]:
        rid = f"resp_{self.name}_{next(self._ids)}"
        text = f"hello from {self.name}"
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
            "metadata": {"slot": self.name},
        }

    async def _responses(
        self, method: str, path: str, body: bytes, send: Send, tag: list[tuple[bytes, bytes]]
    ) -> None:
        parts = path.split("/")  # "", "v1", "responses", id?, action?
        if len(parts) == 3 and method == "POST":
            req = json.loads(body)
            previous = req.get("previous_response_id")
            if previous and previous not in self.responses:
                return await _json(
                    send,
                    404,
                    {
                        "error": {
                            "message": f"Previous response with id '{previous}' not found.",
                            "type": "invalid_request_error",
                            "param": "previous_response_id",
                            "code": "previous_response_not_found",
                        }
                    },
                )
            done = self._response(req, "completed")
            self.responses[done["id"]] = done
            given = req.get("input")
            self.inputs[done["id"]] = [
                {
                    "id": f"in_{done['id']}",
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": str(given)}],
                }
            ]
            if req.get("stream"):
                return await self._stream_response(done, send, tag)
            return await _json(send, 200, done, tag)
        rid = parts[3] if len(parts) > 3 else ""
        found = self.responses.get(rid)
        if found is None:
            return await _json(
                send,
                404,
                {
                    "error": {
                        "message": f"No response with id '{rid}' on {self.name}.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "not_found",
                    }
                },
            )
        if len(parts) == 4 and method == "GET":
            return await _json(send, 200, found, tag)
        if len(parts) == 4 and method == "DELETE":
            del self.responses[rid]
            return await _json(
                send, 200, {"id": rid, "object": "response.deleted", "deleted": True}, tag
            )
        if parts[4:] == ["input_items"] and method == "GET":
            items = self.inputs.get(rid, [])
            return await _json(
                send,
                200,
                {
                    "object": "list",
                    "data": items,
                    "first_id": items[0]["id"] if items else None,
                    "last_id": items[-1]["id"] if items else None,
                    "has_more": False,
                },
                tag,
            )
        if parts[4:] == ["cancel"] and method == "POST":
            found["status"] = "cancelled"
            return await _json(send, 200, found, tag)
        await _json(send, 405, {"error": {"message": "no"}})

    async def _stream_response(
        self, done: dict[str, Any], send: Send, tag: list[tuple[bytes, bytes]]
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), *tag],
            }
        )
        started = {**done, "status": "in_progress", "output": [], "usage": None}
        item = done["output"][0]
        text = item["content"][0]["text"]
        pieces = [text[: len(text) // 2], text[len(text) // 2 :]]
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": started}),
            ("response.in_progress", {"response": started}),
            (
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            ),
            (
                "response.content_part.added",
                {
                    "item_id": item["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                },
            ),
            *(
                (
                    "response.output_text.delta",
                    {
                        "item_id": item["id"],
                        "output_index": 0,
                        "content_index": 0,
                        "delta": piece,
                        "logprobs": [],
                    },
                )
                for piece in pieces
            ),
            (
                "response.output_text.done",
                {
                    "item_id": item["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "text": text,
                    "logprobs": [],
                },
            ),
            (
                "response.content_part.done",
                {
                    "item_id": item["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "part": item["content"][0],
                },
            ),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": done}),
        ]
        for number, (kind, data) in enumerate(events):
            await send(
                {
                    "type": "http.response.body",
                    "body": sse(kind, {"type": kind, "sequence_number": number, **data}),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # --- Anthropic Messages ------------------------------------------------------------------

    async def _messages(
        self, req: dict[str, Any], send: Send, tag: list[tuple[bytes, bytes]]
    ) -> None:
        mid = f"msg_{self.name}_{next(self._ids)}"
        text = f"hello from {self.name}"
        message = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": req.get("model"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 4},
        }
        if not req.get("stream"):
            return await _json(send, 200, message, tag)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), *tag],
            }
        )
        events: list[tuple[str, dict[str, Any]]] = [
            (
                "message_start",
                {
                    "message": {
                        **message,
                        "content": [],
                        "stop_reason": None,
                        "usage": {"input_tokens": 3, "output_tokens": 1},
                    }
                },
            ),
            ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            ("ping", {}),
            *(
                (
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "text_delta", "text": piece}},
                )
                for piece in ("hello ", f"from {self.name}")
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
        for kind, data in events:
            await send(
                {
                    "type": "http.response.body",
                    "body": sse(kind, {"type": kind, **data}),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _images(picture: str) -> dict[str, Any]:
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(picture.encode()).decode()}],
    }


async def _bytes(
    send: Send, status: int, body: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]]
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
