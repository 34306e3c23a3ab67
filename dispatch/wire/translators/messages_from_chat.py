"""The way back of Anthropic Messages served through Chat Completions
(``messages_chat``): a chat completion said as a message, and a chat completion's stream
said as Anthropic's events, re-framed chunk by chunk as they arrive (Anthropic's
"Streaming Messages": ``message_start``, ``ping``, ``content_block_start/delta/stop`` with
one index per block, ``message_delta`` with the stop reason and counts, ``message_stop``).

Pure: no Django, no I/O.
"""

from __future__ import annotations

import uuid
from typing import Any

from dispatch.lib.json_reader import TooDeep, loads
from dispatch.wire.adapters import Translation
from dispatch.wire.errors import dumps
from dispatch.wire.framing import EventReader
from dispatch.wire.protocols import ANTHROPIC
from dispatch.wire.translators.values import count

Json = dict[str, Any]

# Chat's finish reasons, as a message's stop reasons.
_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# A signature a thinking block must carry (the SDK's type has one); hal0web signs nothing,
# and takes thinking blocks sent back out of the conversation again.
_UNSIGNED = ""


def _object(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


def _message_id(upstream_id: Any) -> str:
    """The message's id: the server's completion id under Anthropic's prefix (a log line
    of either names the other), or a new one."""
    if isinstance(upstream_id, str) and upstream_id:
        return f"msg_{upstream_id}"
    return f"msg_{uuid.uuid4().hex}"


def _usage(usage: Any) -> Json:
    """Chat's counts as a message's: prompt tokens read from the server's cache are
    Anthropic's ``cache_read_input_tokens``, not part of ``input_tokens``."""
    if not isinstance(usage, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    prompt, completion = count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
    cached = count(_object(usage.get("prompt_tokens_details")).get("cached_tokens"))
    out = {"input_tokens": prompt, "output_tokens": completion}
    if 0 < cached <= prompt:
        out["input_tokens"], out["cache_read_input_tokens"] = prompt - cached, cached
    return out


def _stop_reason(finish: Any, called_tools: bool) -> str:
    reason = _STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    # Some servers say "stop" after a tool call: the client must still run the tool.
    return "tool_use" if called_tools and reason == "end_turn" else reason


def _reasoning(holder: Json) -> Any:
    """A server's thinking: ``reasoning_content`` (llama.cpp, DeepSeek, older vLLM) or
    ``reasoning`` (newer vLLM, Ollama's OpenAI API)."""
    reasoning = holder.get("reasoning_content")
    return reasoning if reasoning is not None else holder.get("reasoning")


def content_text(content: Any) -> str:
    """The text of a Chat message's content: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers answer with text parts
        return "".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _tool_use(call: Any) -> Json:
    if not isinstance(call, dict):
        raise ValueError("a tool call that is not an object")
    function = _object(call.get("function"))
    arguments = function.get("arguments")
    try:
        tool_input = loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        tool_input = {}  # the model wrote no JSON: the client's tool check says so
    call_id = call.get("id")
    return {
        "type": "tool_use",
        "id": call_id if isinstance(call_id, str) and call_id else f"toolu_{uuid.uuid4().hex}",
        "name": function.get("name") if isinstance(function.get("name"), str) else "",
        "input": tool_input if isinstance(tool_input, dict) else {},
    }


def _first_choice(data: Any) -> Json:
    if not isinstance(data, dict):
        raise ValueError("the answer is not a chat completion")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("a chat completion without choices")
    return choices[0]


def message_of(data: Any, model: Any, thinking: bool) -> Json:
    """A whole chat completion as a message."""
    choice = _first_choice(data)
    said = choice.get("message")
    if not isinstance(said, dict):
        raise ValueError("a chat completion choice without a message")
    content: list[Json] = []
    reasoning = _reasoning(said)
    if thinking and isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": _UNSIGNED})
    text = content_text(said.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    calls = said.get("tool_calls")
    content.extend(_tool_use(c) for c in (calls if isinstance(calls, list) else ()))
    called = any(b["type"] == "tool_use" for b in content)
    return {
        "id": _message_id(data.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(choice.get("finish_reason"), called),
        "stop_sequence": None,
        "usage": _usage(data.get("usage")),
    }


def _event(name: str, data: Json) -> bytes:
    """One Anthropic stream event: named, its data's ``type`` the same name."""
    return b"event: " + name.encode() + b"\ndata: " + dumps({"type": name, **data}) + b"\n\n"


# How each kind of block opens, before its deltas.
_EMPTY: dict[str, Json] = {
    "text": {"type": "text", "text": ""},
    "thinking": {"type": "thinking", "thinking": "", "signature": _UNSIGNED},
}


def _opening(message_id: str, model: Any) -> bytes:
    """A stream's first events: the message with no content yet, and a ping."""
    message = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0},
    }
    return _event("message_start", {"message": message}) + _event("ping", {})


class _Events:
    """A message's stream as it is built: the blocks opened, each with its own index, and
    the counts and stop reason heard so far."""

    def __init__(self, model: Any, thinking: bool) -> None:
        self.model, self.thinking = model, thinking
        self.started = self.done = False
        self.index = -1  # the last block opened
        self.open: str | None = None  # the open block's kind: text, thinking or tool_use
        self.tools: dict[int, int] = {}  # a Chat tool call's index -> its block's index
        self.finish: Any = None
        self.usage: Any = None

    def start(self, message_id: str) -> bytes:
        self.started = True
        return _opening(message_id, self.model)

    def close(self) -> bytes:
        if self.open is None:
            return b""
        self.open = None
        return _event("content_block_stop", {"index": self.index})

    def opened(self, kind: str, block: Json) -> bytes:
        out = self.close()
        self.index += 1
        self.open = kind
        return out + _event("content_block_start", {"index": self.index, "content_block": block})

    def piece(self, kind: str, text: str) -> bytes:
        """Text or thinking, in the open block of its kind (one opened if need be)."""
        out = b"" if self.open == kind else self.opened(kind, _EMPTY[kind])
        delta = {"type": f"{kind}_delta", kind: text}
        return out + _event("content_block_delta", {"index": self.index, "delta": delta})

    def tool(self, call: Any) -> bytes:
        """A piece of a tool call: its first (id and name) opens its block; its arguments
        follow as ``input_json_delta`` (servers stream tool calls one after the other)."""
        if not isinstance(call, dict):
            raise ValueError("a tool call that is not an object")
        at = count(call.get("index"))
        function = _object(call.get("function"))
        out = b""
        if at not in self.tools:
            block = _tool_use({**call, "function": {**function, "arguments": ""}})
            out = self.opened("tool_use", block)
            self.tools[at] = self.index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out += _event("content_block_delta", {"index": self.tools[at], "delta": delta})
        return out

    def chunk(self, data: Json) -> bytes:
        """One Chat stream chunk's part of the message."""
        if data.get("usage") is not None:
            self.usage = data["usage"]
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise ValueError("a chat completion chunk without choices")
        out = b""
        for choice in choices[:1]:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                raise ValueError("a chat completion chunk choice without a delta")
            reasoning = _reasoning(delta)
            if self.thinking and isinstance(reasoning, str) and reasoning:
                out += self.piece("thinking", reasoning)
            text = content_text(delta.get("content"))
            if text:
                out += self.piece("text", text)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                out += self.tool(call)
            if choice.get("finish_reason") is not None:
                self.finish = choice["finish_reason"]
        return out

    def end(self) -> bytes:
        """The message's last events: its open block closed, the stop reason and counts."""
        self.done = True
        usage = _usage(self.usage)
        delta = {"stop_reason": _stop_reason(self.finish, bool(self.tools)), "stop_sequence": None}
        return (
            self.close()
            + _event("message_delta", {"delta": delta, "usage": usage})
            + _event("message_stop", {})
        )


class MessagesFromChat(Translation):
    """One call's way back: the chat completion as a message, or its stream as Anthropic's
    events, re-framed as each upstream chunk arrives."""

    def __init__(self, model: Any, thinking: bool, streamed: bool) -> None:
        self.events = _Events(model, thinking)
        self.reader = EventReader()
        if streamed:
            # A server that answered a stream request with one JSON answer: the client still
            # reads a stream, of the whole message.
            self.answer_type = self.stream_type

    def answer(self, content: bytes) -> bytes:
        try:
            data = loads(content)
        except TooDeep as exc:
            raise ValueError(f"the answer is {exc}") from exc
        except ValueError as exc:
            raise ValueError("the answer is not JSON") from exc
        message = message_of(data, self.events.model, self.events.thinking)
        if self.answer_type == self.stream_type:
            return _as_events(message)
        return dumps(message)

    def stream(self, chunk: bytes) -> bytes:
        out = b""
        for _name, data in self.reader.feed(chunk):
            if self.events.done:
                continue
            if data.strip() == b"[DONE]":
                out += self._started(None) + self.events.end()
                continue
            try:
                event = loads(data)
            except TooDeep as exc:
                raise ValueError(f"a stream event is {exc}") from exc
            except ValueError as exc:
                raise ValueError("a stream event that is not JSON") from exc
            if not isinstance(event, dict):
                raise ValueError("a stream event that is not an object")
            out += self._started(event.get("id"))
            if "error" in event:  # the server failed mid-stream (llama.cpp says it so)
                out += _stream_error(event["error"])
                self.events.done = True
                continue
            out += self.events.chunk(event)
        return out

    def end(self) -> bytes:
        if self.events.done:
            return b""
        if self.reader.cut:
            raise ValueError("the stream ended in the middle of an event")
        # No [DONE]: some servers just end the stream.
        return self._started(None) + self.events.end()

    def _started(self, upstream_id: Any) -> bytes:
        return b"" if self.events.started else self.events.start(_message_id(upstream_id))


def _stream_error(error: Any) -> bytes:
    said = error.get("message") if isinstance(error, dict) else error
    message = f"The model server failed mid-stream: {said}"
    return b"event: error\ndata: " + ANTHROPIC.error_body(502, "upstream_error", message) + b"\n\n"


def _as_events(message: Json) -> bytes:
    """A whole message as the stream a client asked for: each block opened, said in one
    delta, and closed."""
    out = _opening(message["id"], message["model"])
    for index, block in enumerate(message["content"]):
        kind = block["type"]
        if kind == "tool_use":
            opening = {**block, "input": {}}
            delta: Json = {
                "type": "input_json_delta",
                "partial_json": dumps(block["input"]).decode(),
            }
        else:
            opening, delta = _EMPTY[kind], {"type": f"{kind}_delta", kind: block[kind]}
        out += _event("content_block_start", {"index": index, "content_block": opening})
        out += _event("content_block_delta", {"index": index, "delta": delta})
        out += _event("content_block_stop", {"index": index})
    ending = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    out += _event("message_delta", {"delta": ending, "usage": message["usage"]})
    return out + _event("message_stop", {})
