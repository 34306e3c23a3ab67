"""A fake OpenAI-compatible server that answers the way llama.cpp's ``llama-server`` does
(its README: /v1/chat/completions, /v1/completions, /v1/embeddings; OpenAI's API reference
for the shapes): what a translated Ollama request meets.

Chat answers say what they were asked, so a test can see what reached the server: the last
user message's text (``echo: ...``) and how many images came with it. A request with
``tools`` gets a call of the first tool (``finish_reason: tool_calls``; streamed in pieces:
its id and name first, then its arguments' text in two parts, as llama.cpp streams it);
``chat_template_kwargs.enable_thinking`` true gets ``reasoning_content`` first; a
``response_format`` gets JSON. ``max_tokens`` below the answer's pieces cuts it
(``finish_reason: length``). A stream carries its usage in a last chunk only when asked
(``stream_options.include_usage``), as OpenAI's API does. ``timings`` (llama.cpp's own
durations) go along when ``send_timings``. Text completions echo the prompt (and a suffix);
embeddings give one vector per input, ``[len(text), index]``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fake_wire import Call, Seen, end_stream, read_request, send_json, send_part, start_stream
from tests.fakes import FakeUpstream

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
TOOL_ARGS = '{"city": "Paris"}'
THOUGHT = "thinking it over"


@dataclass
class FakeChat(FakeUpstream):
    send_timings: bool = False
    # A stream's text piece k (k >= 1), and its last event, go out only once gates[k - 1] is
    # set (a test sets it when it has the line of the piece before); a gate not set within
    # 5 s is counted in gate_timeouts and the stream goes on.
    gates: list[threading.Event] = field(default_factory=list)
    gate_timeouts: int = 0

    def __post_init__(self) -> None:
        self.listing = "llama.cpp"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path not in PATHS:
            return await super().__call__(scope, receive, send)
        body = await read_request(scope, receive, send)
        if body is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Seen(path, headers, body))
        req = json.loads(body)
        call = Call(scope["method"], path, headers, body, receive, send)
        if path == "/v1/embeddings":
            return await self._vectors(req, call)
        if path == "/v1/completions":
            return await self._text(req, call)
        await self._chat(req, call)

    def _listed(self, model: str) -> dict[str, Any]:
        entry = super()._listed(model)
        entry["meta"] = {"n_ctx_train": 8192, "n_params": 1_235_814_432, "size": 807_694_464}
        return entry

    # --- chat ------------------------------------------------------------------------------

    def _pieces(self, req: dict[str, Any]) -> tuple[list[str], str, list[str]]:
        """The answer's text pieces, why it ends, and its reasoning pieces."""
        if req.get("response_format"):
            pieces = ['{"answer":', " 42}"]
        else:
            last = next(m for m in reversed(req["messages"]) if m["role"] in ("user", "tool"))
            content = last["content"]
            if isinstance(content, list):
                text = " ".join(p["text"] for p in content if p["type"] == "text")
                images = sum(1 for p in content if p["type"] == "image_url")
                pieces = [f"echo: {text}", f" images={images}"]
            else:
                pieces = [f"echo: {content}", " 1"]
        finish = "stop"
        limit = req.get("max_tokens")
        if isinstance(limit, int) and limit < len(pieces):
            pieces, finish = pieces[:limit], "length"
        thinking = req.get("chat_template_kwargs", {}).get("enable_thinking") is True
        return pieces, finish, [THOUGHT[:8], THOUGHT[8:]] if thinking else []

    def _wants_tool(self, req: dict[str, Any]) -> str | None:
        tools = req.get("tools")
        if tools and req["messages"][-1]["role"] == "user":
            return str(tools[0]["function"]["name"])
        return None

    def _usage(self, req: dict[str, Any], completion: int) -> dict[str, int]:
        prompt = sum(len(json.dumps(m).split()) for m in req.get("messages", []))
        prompt = prompt or len(str(req.get("prompt", "")).split())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _timings(self, req: dict[str, Any], completion: int) -> dict[str, Any]:
        usage = self._usage(req, completion)
        return {
            "prompt_n": usage["prompt_tokens"],
            "prompt_ms": 12.5,
            "predicted_n": completion,
            "predicted_ms": 250.0,
        }

    async def _chat(self, req: dict[str, Any], call: Call) -> None:
        tool = self._wants_tool(req)
        pieces, finish, thoughts = self._pieces(req)
        if tool:
            pieces, finish = [], "tool_calls"
        if req.get("stream"):
            return await self._chat_stream(req, call, pieces, finish, thoughts, tool)
        message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces) or None}
        if thoughts:
            message["reasoning_content"] = "".join(thoughts)
        if tool:
            message["tool_calls"] = [
                {
                    "id": "call_fake_1",
                    "type": "function",
                    "function": {"name": tool, "arguments": TOOL_ARGS},
                }
            ]
        answer: dict[str, Any] = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model"),
            "choices": [{"index": 0, "finish_reason": finish, "message": message}],
            "usage": self._usage(req, len(pieces) + len(thoughts) + (3 if tool else 0)),
        }
        if self.send_timings:
            answer["timings"] = self._timings(req, answer["usage"]["completion_tokens"])
        await send_json(call.send, 200, answer, self.tag)

    def _event(self, req: dict[str, Any], delta: dict[str, Any], finish: str | None) -> bytes:
        event = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.get("model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    async def _chat_stream(
        self,
        req: dict[str, Any],
        call: Call,
        pieces: list[str],
        finish: str,
        thoughts: list[str],
        tool: str | None,
    ) -> None:
        await start_stream(call.send, b"text/event-stream", self.tag)
        await send_part(call.send, self._event(req, {"role": "assistant", "content": None}, None))
        for thought in thoughts:
            await send_part(call.send, self._event(req, {"reasoning_content": thought}, None))
        for k, piece in enumerate(pieces):
            await self._gate(k)
            await send_part(call.send, self._event(req, {"content": piece}, None))
        if tool:
            head = {"index": 0, "id": "call_fake_1", "type": "function"}
            first = {**head, "function": {"name": tool, "arguments": ""}}
            await send_part(call.send, self._event(req, {"tool_calls": [first]}, None))
            for part in (TOOL_ARGS[:9], TOOL_ARGS[9:]):
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
                await send_part(call.send, self._event(req, delta, None))
        completion = len(pieces) + len(thoughts) + (3 if tool else 0)
        await self._gate(len(pieces))
        last = self._event(req, {}, finish)
        if self.send_timings:
            event = json.loads(last[6:])
            event["timings"] = self._timings(req, completion)
            last = b"data: " + json.dumps(event).encode() + b"\n\n"
        await send_part(call.send, last)
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": f"chatcmpl-{self.name}",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": self._usage(req, completion),
            }
            await send_part(call.send, b"data: " + json.dumps(usage).encode() + b"\n\n")
        await end_stream(call.send, b"data: [DONE]\n\n")

    async def _gate(self, k: int) -> None:
        if 1 <= k <= len(self.gates) and not await asyncio.to_thread(self.gates[k - 1].wait, 5):
            self.gate_timeouts += 1

    # --- text completions and embeddings ----------------------------------------------------

    async def _text(self, req: dict[str, Any], call: Call) -> None:
        text = f"completed: {req['prompt']}" + (
            f" suffix={req['suffix']}" if "suffix" in req else ""
        )
        usage = self._usage(req, 2)
        if not req.get("stream"):
            answer = {
                "id": f"cmpl-{self.name}",
                "object": "text_completion",
                "model": req.get("model"),
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": usage,
            }
            return await send_json(call.send, 200, answer, self.tag)
        await start_stream(call.send, b"text/event-stream", self.tag)
        for piece, finish in ((text, None), (" done", "stop")):
            event = {
                "object": "text_completion",
                "model": req.get("model"),
                "choices": [{"index": 0, "text": piece, "finish_reason": finish}],
            }
            await send_part(call.send, b"data: " + json.dumps(event).encode() + b"\n\n")
        if (req.get("stream_options") or {}).get("include_usage"):
            event = {"object": "text_completion", "choices": [], "usage": usage}
            await send_part(call.send, b"data: " + json.dumps(event).encode() + b"\n\n")
        await end_stream(call.send, b"data: [DONE]\n\n")

    async def _vectors(self, req: dict[str, Any], call: Call) -> None:
        inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(text)), float(i)]}
            for i, text in enumerate(inputs)
        ]
        data.reverse()  # the index says the order, not the position
        answer = {
            "object": "list",
            "model": req.get("model"),
            "data": data,
            "usage": {"prompt_tokens": len(inputs) * 3, "total_tokens": len(inputs) * 3},
        }
        await send_json(call.send, 200, answer, self.tag)
