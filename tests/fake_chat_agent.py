"""A chat-only model server that acts on what Chat Completions documents (the OpenAI API
reference, and llama.cpp's server as it extends it): it calls the tools it is offered,
reads their results back, reasons when asked (``reasoning_effort`` -> ``reasoning_content``),
follows ``response_format`` (a JSON schema: an object of its properties), stops at
``max_tokens`` (``finish_reason: "length"``), counts tokens (words) in ``usage``, and
streams all of it as chunks (``delta.reasoning_content``, ``delta.content``,
``delta.tool_calls`` with an index, a usage chunk when ``stream_options.include_usage``,
``[DONE]``). It has no ``/v1/responses``: a slot in front of it offers only chat.

Everything else (health, the model list) is the plain fake's (tests/fakes.py), and so is the
record of what it was sent (``agent.upstream.requests``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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

_SAMPLES = {
    "string": "sunny",
    "number": 21.5,
    "integer": 21,
    "boolean": True,
    "array": [],
    "object": {},
}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _typed(schema: Any) -> bool:
    return isinstance(schema, dict) and isinstance(schema.get("type"), str)


def _words(text: str) -> int:
    return len(text.split())


@dataclass
class ChatAgent:
    """``upstream`` answers the probes; chat completions are answered here."""

    upstream: FakeUpstream
    # Whether it calls an offered tool (a real client such as Codex offers many it should
    # not call in a test that wants its words).
    calls_tools: bool = True
    # The call it makes: its arguments (by default {"city": <the user's last words>}), and
    # the tool by name (by default the one tool_choice names, else the first offered).
    arguments: dict[str, Any] | None = None
    tool: str | None = None

    @property
    def name(self) -> str:
        return self.upstream.name

    def chats(self) -> list[dict[str, Any]]:
        """The chat completion requests it was sent, parsed."""
        return [s.json for s in self.upstream.requests if s.path == "/v1/chat/completions"]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.upstream(scope, receive, send)
        body = await read_request(scope, receive, send)
        assert body is not None
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.upstream.requests.append(Seen(scope["path"], headers, body))
        req = json.loads(body)
        turn = self._turn(req)
        if req.get("stream"):
            return await self._stream(req, turn, send)
        await send_json(send, 200, self._answer(req, turn), self.upstream.tag)

    # --- what the model says -----------------------------------------------------------------

    def _turn(self, req: dict[str, Any]) -> dict[str, Any]:
        messages = req["messages"]
        last = messages[-1]
        turn: dict[str, Any] = {"reasoning": None, "text": None, "calls": [], "finish": "stop"}
        if req.get("reasoning_effort"):
            turn["reasoning"] = f"thinking {req['reasoning_effort']} about it"
        tools = req.get("tools") or []
        fmt = req.get("response_format") or {}
        if last["role"] == "tool":
            turn["text"] = f"the tool said: {_text(last['content'])}"
        elif tools and self.calls_tools and req.get("tool_choice") != "none":
            chosen = req.get("tool_choice")
            name = (
                chosen["function"]["name"]
                if isinstance(chosen, dict)
                else self.tool or tools[0]["function"]["name"]
            )
            arguments = self.arguments or {"city": _text(last["content"])}
            turn["calls"] = [
                {"id": f"call_{self.name}_1", "name": name, "arguments": json.dumps(arguments)}
            ]
            turn["finish"] = "tool_calls"
        elif fmt.get("type") == "json_schema":
            props = fmt["json_schema"]["schema"].get("properties")
            props = props if isinstance(props, dict) else {}
            turn["text"] = json.dumps(
                {
                    k: _SAMPLES.get(v.get("type"), "x") if _typed(v) else "x"
                    for k, v in props.items()
                }
            )
        elif fmt.get("type") == "json_object":
            turn["text"] = '{"ok": true}'
        else:
            turn["text"] = self.upstream.reply or f"hello from {self.name}"
        limit = req.get("max_tokens")
        if turn["text"] is not None and isinstance(limit, int) and _words(turn["text"]) > limit:
            turn["text"] = " ".join(turn["text"].split()[:limit])
            turn["finish"] = "length"
        return turn

    def _usage(self, req: dict[str, Any], turn: dict[str, Any]) -> dict[str, Any]:
        prompt = sum(_words(_text(m.get("content"))) for m in req["messages"])
        reasoning = _words(turn["reasoning"] or "")
        completion = _words(turn["text"] or "") + reasoning + len(turn["calls"])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }

    def _answer(self, req: dict[str, Any], turn: dict[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": turn["text"]}
        if turn["reasoning"]:
            message["reasoning_content"] = turn["reasoning"]
        if turn["calls"]:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in turn["calls"]
            ]
        return {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": turn["finish"]}],
            "usage": self._usage(req, turn),
        }

    # --- the same, streamed ------------------------------------------------------------------

    def _chunk(
        self, req: dict[str, Any], delta: dict[str, Any], finish: str | None = None
    ) -> bytes:
        event = {
            "id": f"chatcmpl-{self.name}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.get("model"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    def _deltas(self, turn: dict[str, Any]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        for word in (turn["reasoning"] or "").split(" ") if turn["reasoning"] else ():
            deltas.append({"reasoning_content": word + " "})
        text = turn["text"] or ""
        for i, word in enumerate(text.split(" ") if text else ()):
            deltas.append({"content": word if i == 0 else " " + word})
        for index, call in enumerate(turn["calls"]):
            head = {"index": index, "id": call["id"], "type": "function"}
            deltas.append(
                {"tool_calls": [{**head, "function": {"name": call["name"], "arguments": ""}}]}
            )
            half = len(call["arguments"]) // 2
            for piece in (call["arguments"][:half], call["arguments"][half:]):
                deltas.append({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        return deltas

    async def _stream(self, req: dict[str, Any], turn: dict[str, Any], send: Send) -> None:
        await start_stream(send, b"text/event-stream", self.upstream.tag)
        for delta in self._deltas(turn):
            await send_part(send, self._chunk(req, delta))
        await send_part(send, self._chunk(req, {}, turn["finish"]))
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": f"chatcmpl-{self.name}",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": self._usage(req, turn),
            }
            await send_part(send, b"data: " + json.dumps(usage).encode() + b"\n\n")
        await end_stream(send, b"data: [DONE]\n\n")
