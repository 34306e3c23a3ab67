"""A chat/completions answer or stream back as an OpenAI Response (the way back of
``responses_chat``).

The answer is one Response object; the stream is the Responses API's typed events, in the
order the ``openai`` SDK's stream helper and Codex read them, each with the next
``sequence_number``: ``response.created``, ``response.in_progress``, then per output item
``response.output_item.added``, its content part, its deltas (``output_text``,
``reasoning_text``, ``function_call_arguments``), their ``.done`` and
``response.output_item.done``, and last ``response.completed`` with the whole Response.
A response cut by its length limit is ``status: "incomplete"`` with ``incomplete_details``,
still closed by ``response.completed`` (the SDK's helper and Codex finish only on that one).

The finished Response, with the input it answered, is what the translation ``kept``: the API
layer stores it (the slot keeps nothing), unless the request said ``store: false``.
Pure: no Django, no I/O.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatch.lib.json_reader import TooDeep, loads
from dispatch.wire.adapters import Translation
from dispatch.wire.errors import dumps
from dispatch.wire.framing import EventReader
from dispatch.wire.translators.responses_echo import echoed
from dispatch.wire.translators.values import count


@dataclass(frozen=True, slots=True)
class Asked:
    """What a Responses request said that its answer repeats or its store keeps."""

    model: Any  # the model name the client asked for
    echo: Mapping[str, Any]
    items: list[dict[str, Any]]  # its input, as items with ids
    history: list[dict[str, Any]]  # the conversation its previous_response_id stands for
    dropped: tuple[str, ...]
    stream: bool

    @classmethod
    def of(
        cls,
        body: Mapping[str, Any],
        items: list[dict[str, Any]],
        history: list[dict[str, Any]],
        dropped: tuple[str, ...],
        stream: bool,
        tools: list[dict[str, Any]],
    ) -> Asked:
        """``tools``: the chat tools the request was answered with."""
        return cls(body.get("model"), echoed(body, tools), items, history, dropped, stream)

    @property
    def store(self) -> bool:
        return bool(self.echo["store"])


@dataclass(frozen=True, slots=True)
class Made:
    """A translated response for hal0web's store: the Response, the input it answered
    (its own items, and the conversation before them)."""

    response: dict[str, Any]
    items: list[dict[str, Any]]
    history: list[dict[str, Any]]

    @property
    def response_id(self) -> str:
        return str(self.response["id"])


def new_id(kind: str) -> str:
    """A fresh id hal0web issues: ``resp_hal0…`` for a response, ``msg_hal0…`` for a
    message item (``rs`` reasoning, ``fc`` a function call)."""
    return f"{kind}_hal0{secrets.token_hex(20)}"


def message_item(iid: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"id": iid, "type": "message", "status": status, "role": "assistant", "content": [part]}


def reasoning_item(iid: str, text: str, status: str) -> dict[str, Any]:
    return {
        "id": iid,
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "encrypted_content": None,
    }


def call_item(iid: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": iid,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def usage_of(usage: Any) -> dict[str, Any] | None:
    """Chat's token counts under the Responses API's names (None: the upstream sent none)."""
    if not isinstance(usage, dict):
        return None
    given = usage.get("prompt_tokens_details")
    cached = given.get("cached_tokens") if isinstance(given, dict) else None
    given = usage.get("completion_tokens_details")
    reasoning = given.get("reasoning_tokens") if isinstance(given, dict) else None
    inp, out = count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": count(cached)},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": count(reasoning)},
        "total_tokens": count(usage.get("total_tokens")) or inp + out,
    }


def _ending(finish_reason: Any) -> tuple[str, dict[str, str] | None]:
    """The Response's status and incomplete_details for chat's finish_reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _loads(data: bytes) -> Any:
    try:
        return loads(data)
    except TooDeep:
        raise  # (its own words: JSON, nested too deep)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None


class FromChat(Translation):
    """One translated call's way back: its Response id, what the request asked, and for a
    stream the items open so far."""

    def __init__(self, asked: Asked, response_id: str) -> None:
        self.asked = asked
        self.response_id = response_id
        self.created_at = int(time.time())
        if asked.dropped:
            self.headers = {"X-Hal0-Dropped": ", ".join(asked.dropped)}
        self._stream: _Events | None = None

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        incomplete: dict[str, str] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            **self.asked.echo,
            "model": self.asked.model,
            "output": output,
            "usage": usage,
        }

    def finished(self, response: dict[str, Any]) -> None:
        """The Response is whole: it is kept unless the request said ``store: false``."""
        if self.asked.store:
            self.kept = Made(response, self.asked.items, self.asked.history)

    def answer(self, content: bytes) -> bytes:
        data = _loads(content)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ValueError("a chat completion without choices")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise ValueError("a chat completion choice without a message")
        status, incomplete = _ending(choices[0].get("finish_reason"))
        item_status = "incomplete" if status == "incomplete" else "completed"
        output: list[dict[str, Any]] = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            output.append(reasoning_item(new_id("rs"), reasoning, item_status))
        text = message.get("content")
        calls = message.get("tool_calls")
        calls = calls if isinstance(calls, list) else []
        if (isinstance(text, str) and text) or not calls:
            said = text if isinstance(text, str) else ""
            output.append(message_item(new_id("msg"), said, item_status))
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise ValueError("a tool call without a function")
            arguments = function.get("arguments")
            output.append(
                call_item(
                    new_id("fc"),
                    _call_id(call.get("id")),
                    str(function.get("name") or ""),
                    arguments if isinstance(arguments, str) else dumps(arguments or {}).decode(),
                    "completed",
                )
            )
        response = self.response(status, output, usage_of(data.get("usage")), incomplete)
        self.finished(response)
        return dumps(response)

    def stream(self, chunk: bytes) -> bytes:
        if self._stream is None:
            self._stream = _Events(self)
        return self._stream.feed(chunk)

    def end(self) -> bytes:
        if self._stream is None:  # an empty stream: still a whole Response
            self._stream = _Events(self)
        return self._stream.close()


def _call_id(given: Any) -> str:
    return given if isinstance(given, str) and given else f"call_{secrets.token_hex(12)}"


@dataclass(slots=True)
class _Open:
    """An output item whose events are still coming."""

    kind: str  # message | reasoning | function_call
    index: int  # its output_index
    iid: str
    text: str = ""  # its text, reasoning text or arguments so far
    call_id: str = ""
    name: str = ""
    done: bool = False
    status: str = "in_progress"  # as its output_item.done said it

    def item(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return message_item(self.iid, self.text, status)
        if self.kind == "reasoning":
            return reasoning_item(self.iid, self.text, status)
        return call_item(self.iid, self.call_id, self.name, self.text, status)


@dataclass(slots=True)
class _Events:
    """The typed event stream of one translated call, made as the chat chunks arrive."""

    back: FromChat
    reader: EventReader = field(default_factory=EventReader)
    sequence: int = 0
    items: list[_Open] = field(default_factory=list)  # by output_index
    text: _Open | None = None  # the open message or reasoning item
    calls: dict[Any, _Open] = field(default_factory=dict)  # open function calls, by chat index
    finish_reason: Any = None
    usage: dict[str, Any] | None = None
    started: bool = False
    over: bool = False

    def event(self, kind: str, **data: Any) -> bytes:
        payload = dumps({"type": kind, "sequence_number": self.sequence, **data})
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"

    def _start(self) -> list[bytes]:
        self.started = True
        begun = self.back.response("in_progress", [], None)
        return [
            self.event("response.created", response=begun),
            self.event("response.in_progress", response=begun),
        ]

    def feed(self, chunk: bytes) -> bytes:
        out = [] if self.started else self._start()
        for _name, data in self.reader.feed(chunk):
            if self.over:
                continue
            if data.strip() == b"[DONE]":
                out += self._complete()
                continue
            event = _loads(data)
            if not isinstance(event, dict):
                raise ValueError("a stream event that is not a JSON object")
            if event.get("error") is not None:
                out += self._failed(event["error"])
                continue
            if isinstance(event.get("usage"), dict):
                self.usage = usage_of(event["usage"])
            choices = event.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                out += self._choice(choices[0])
        return b"".join(out)

    def close(self) -> bytes:
        out = [] if self.started else self._start()
        if not self.over:
            out += self._complete()
        return b"".join(out)

    # --- one chunk's choice --------------------------------------------------------------------

    def _choice(self, choice: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out += self._text("reasoning", reasoning)
            content = delta.get("content")
            if isinstance(content, str) and content:
                out += self._text("message", content)
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if isinstance(call, dict):
                    out += self._call(call)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
            out += self._close_all()
        return out

    def _open(self, kind: str, **fields: Any) -> _Open:
        item = _Open(
            kind,
            len(self.items),
            new_id({"message": "msg", "reasoning": "rs"}.get(kind, "fc")),
            **fields,
        )
        self.items.append(item)
        return item

    def _text(self, kind: str, piece: str) -> list[bytes]:
        out: list[bytes] = []
        if self.text is not None and self.text.kind != kind:
            out += self._close(self.text)
        out += self._close_calls()
        if self.text is None:
            self.text = self._open(kind)
            out += self._added(self.text)
        item = self.text
        item.text += piece
        at = {"item_id": item.iid, "output_index": item.index, "content_index": 0}
        if kind == "message":
            out.append(self.event("response.output_text.delta", **at, delta=piece, logprobs=[]))
        else:
            out.append(self.event("response.reasoning_text.delta", **at, delta=piece))
        return out

    def _call(self, call: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        key = call.get("index", call.get("id", 0))
        key = key if isinstance(key, int | str) else 0
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        item = self.calls.get(key)
        if item is None or item.done:  # (a call already closed takes no more: a new item)
            if self.text is not None:
                out += self._close(self.text)
            name = function.get("name")
            item = self._open(
                "function_call",
                call_id=_call_id(call.get("id")),
                name=name if isinstance(name, str) else "",
            )
            self.calls[key] = item
            out += self._added(item)
        elif isinstance(function.get("name"), str) and function["name"] != item.name:
            item.name += function["name"]  # a name sent in pieces
        piece = function.get("arguments")
        if isinstance(piece, str) and piece:
            item.text += piece
            out.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=item.iid,
                    output_index=item.index,
                    delta=piece,
                )
            )
        return out

    # --- items opening and closing -------------------------------------------------------------

    def _added(self, item: _Open) -> list[bytes]:
        out = [
            self.event(
                "response.output_item.added", output_index=item.index, item=_in_progress(item)
            )
        ]
        if item.kind != "function_call":
            part = _part(item.kind, "")
            out.append(
                self.event(
                    "response.content_part.added",
                    item_id=item.iid,
                    output_index=item.index,
                    content_index=0,
                    part=part,
                )
            )
        return out

    def _close(self, item: _Open) -> list[bytes]:
        if item is self.text:
            self.text = None
        item.done = True
        status = item.status = (
            "incomplete"
            if self.finish_reason == "length" and item.kind != "function_call"
            else "completed"
        )
        at = {"item_id": item.iid, "output_index": item.index}
        out: list[bytes] = []
        if item.kind == "function_call":
            out.append(
                self.event(
                    "response.function_call_arguments.done",
                    **at,
                    name=item.name,
                    arguments=item.text,
                )
            )
        else:
            kind = "output_text" if item.kind == "message" else "reasoning_text"
            extra: dict[str, Any] = {"logprobs": []} if item.kind == "message" else {}
            out.append(
                self.event(f"response.{kind}.done", **at, content_index=0, text=item.text, **extra)
            )
            out.append(
                self.event(
                    "response.content_part.done",
                    **at,
                    content_index=0,
                    part=_part(item.kind, item.text),
                )
            )
        out.append(
            self.event("response.output_item.done", output_index=item.index, item=item.item(status))
        )
        return out

    def _close_calls(self) -> list[bytes]:
        out: list[bytes] = []
        for item in self.calls.values():
            if not item.done:
                out += self._close(item)
        return out

    def _close_all(self) -> list[bytes]:
        out = self._close(self.text) if self.text is not None else []
        return out + self._close_calls()

    def _complete(self) -> list[bytes]:
        out = self._close_all()
        if not self.items:  # nothing said at all: still one (empty) message, as answers have
            self.text = self._open("message")
            out += self._added(self.text) + self._close(self.text)
        self.over = True
        status, incomplete = _ending(self.finish_reason)
        output = [i.item(i.status) for i in self.items]  # as each one's .done event said
        response = self.back.response(status, output, self.usage, incomplete)
        self.back.finished(response)
        out.append(self.event("response.completed", response=response))
        return out

    def _failed(self, error: Any) -> list[bytes]:
        """The upstream's error event mid-stream: the Response failed (not kept)."""
        said = error if isinstance(error, dict) else {"message": str(error)}
        code = said.get("code") if isinstance(said.get("code"), str) else "upstream_error"
        failure = {"code": code, "message": str(said.get("message") or "the upstream failed")}
        self.over = True
        output = [i.item("incomplete") for i in self.items if i.done]
        response = self.back.response("failed", output, self.usage, None, failure)
        return [self.event("response.failed", response=response)]


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": text}


def _in_progress(item: _Open) -> dict[str, Any]:
    made = item.item("in_progress")
    if item.kind != "function_call":
        made["content"] = []
    return made
