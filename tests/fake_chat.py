"""A chat-only model server (llama-cpp-python, FastFlowLM, an older vLLM or Ollama): OpenAI's
Chat Completions and nothing of Anthropic's, answering as OpenAI's API reference documents
a chat completion and its stream chunks, with the fields local servers add.

Its answer is scripted: text, a server's reasoning (``reasoning_content``, as llama.cpp and
vLLM send it), tool calls (streamed as OpenAI does: the first piece of each carries its id
and name, the arguments follow in pieces), the finish reason and the counts. ``/tokenize`` at
the server's root answers as llama.cpp's does (``{"tokens": [...]}``, one per word here),
unless the fake is told it has no tokenizer. ``/v1/messages`` is a 404, as on such a server.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from tests.fake_wire import (
    Receive,
    Seen,
    Send,
    end_stream,
    read_request,
    send_json,
    send_part,
    start_stream,
)
from tests.fakes import FakeUpstream

# What this fake answers itself; every other path (the probes) is FakeUpstream's.
OWN = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/messages/count_tokens", "/tokenize"})


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass
class Reply:
    """One request's answer: its text, its tool calls (Chat's shape), its finish reason."""

    text: str
    calls: list[dict[str, Any]]
    finish: str


@dataclass
class ChatUpstream(FakeUpstream):
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict[str, Any] = field(
        default_factory=lambda: {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    )
    tokenizer: bool = True
    silent: bool = False  # no text at all (a tool call alone)
    # Once the conversation carries a tool's result, answer with its text and call nothing:
    # an agent's loop (call, result, answer) in two requests.
    answers_tool_results: bool = False
    # Answer a stream request with one JSON answer (a server that ignores "stream").
    ignores_stream: bool = False
    # When set, a stream stops after its first text piece until the test sets it.
    hold: threading.Event | None = None
    # Stream chunks sent so far (the last stream's).
    sent: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in OWN:
            return await super().__call__(scope, receive, send)
        body = await read_request(scope, receive, send)
        assert body is not None
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Seen(scope["path"], headers, body))
        if scope["path"] == "/tokenize" and self.tokenizer:
            words = str(json.loads(body).get("content", "")).split()
            return await send_json(send, 200, {"tokens": list(range(len(words)))})
        if scope["path"] != "/v1/chat/completions":
            return await send_json(send, 404, {"error": {"code": 404, "message": "File Not Found"}})
        if self.fail_status:
            error = {"message": f"{self.name} says no", "type": "invalid_request_error"}
            return await send_json(send, self.fail_status, {"error": error})
        req = json.loads(body)
        reply = self._reply(req)
        if req.get("stream") and not self.ignores_stream:
            return await self._chat_stream(req, reply, send)
        await send_json(send, 200, self._answer(req, reply), self.tag)

    def _reply(self, req: dict[str, Any]) -> Reply:
        """What this request is answered: the script, or a tool's result said back."""
        results = [m for m in req.get("messages", []) if m.get("role") == "tool"]
        if self.answers_tool_results and results:
            return Reply(f"the tool said: {results[-1]['content']}", [], "stop")
        text = "" if self.silent else self.reply or f"hello from {self.name}"
        calls = [
            {
                "id": call.id or f"call_{self.name}_{i}",
                "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
            }
            for i, call in enumerate(self.tool_calls)
        ]
        return Reply(text, calls, self.finish_reason)

    def _answer(self, req: dict[str, Any], reply: Reply) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
        if self.reasoning:
            message["reasoning_content"] = self.reasoning
        if reply.calls:
            message["tool_calls"] = reply.calls
        return {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion",
            "created": 1,
            "model": req.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}],
            "usage": self.usage,
        }

    def _deltas(self, reply: Reply) -> list[dict[str, Any]]:
        """The answer in pieces, as the stream's deltas."""
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None}]
        half = len(self.reasoning) // 2
        for piece in (self.reasoning[:half], self.reasoning[half:]):
            if piece:
                deltas.append({"reasoning_content": piece})
        if reply.text:
            words = reply.text.split(" ")
            deltas += [{"content": w if i == 0 else " " + w} for i, w in enumerate(words)]
        for i, call in enumerate(reply.calls):
            head = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
            deltas.append({"tool_calls": [{"index": i, **head}]})
            arguments = call["function"]["arguments"]
            for part in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": part}}]})
        return deltas

    def _event(self, req: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": req.get("model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def _chat_stream(self, req: dict[str, Any], reply: Reply, send: Send) -> None:
        await start_stream(send, b"text/event-stream", self.tag)
        self.sent = 0
        held = False
        for delta in self._deltas(reply):
            await send_part(send, self._event(req, delta, None))
            self.sent += 1
            if self.hold is not None and "content" in delta and delta["content"] and not held:
                held = True
                await asyncio.to_thread(self.hold.wait, 30)
        await send_part(send, self._event(req, {}, reply.finish))
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {"id": f"chatcmpl-{self.name}", "choices": [], "usage": self.usage}
            await send_part(send, b"data: " + json.dumps(usage).encode() + b"\n\n")
        await end_stream(send, b"data: [DONE]\n\n")
