"""Ollama's answers from an OpenAI-compatible server's: the way back of
``ollama_openai``'s adapters. A chat or text completion becomes ``/api/chat``'s or
``/api/generate``'s answer, its SSE stream Ollama's NDJSON line by line as the events
arrive (a streamed tool call's pieces held until the call is whole, its arguments then an
object), the last line ``done: true`` with the upstream's token counts and the durations in
nanoseconds: the server's own ``timings`` (llama.cpp's) where it sends them, else measured
here. An embeddings answer becomes ``/api/embed``'s or ``/api/embeddings``'.

Pure: no Django, no I/O (the clock is read for the durations).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from dispatch.lib.json_reader import loads
from dispatch.wire.adapters import Translation
from dispatch.wire.errors import dumps
from dispatch.wire.framing import EventReader
from dispatch.wire.translators.values import is_integer, is_number
from dispatch.wire.translators.values import text as text_of

_FINISH = {"length": "length"}  # everything else (stop, tool_calls, content_filter): stop


def created_at() -> str:
    """Now, as Ollama writes ``created_at`` (RFC 3339, UTC)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _line(data: Mapping[str, Any]) -> bytes:
    return dumps(data) + b"\n"


def _count(value: object) -> int | None:
    return value if is_integer(value) and value >= 0 else None


def _ms_ns(value: object) -> int | None:
    """Milliseconds (llama.cpp's timings) as nanoseconds."""
    if is_number(value) and value >= 0:
        return int(value * 1_000_000)
    return None


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _arguments(text: object, name: str) -> dict[str, Any]:
    """A call's arguments (OpenAI: JSON text) as Ollama's object."""
    if isinstance(text, dict):
        return text
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    try:
        value = loads(text) if isinstance(text, str) else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"the arguments of its call to {name!r} are not a JSON object")
    return value


def _calls_back(raw: object) -> list[dict[str, Any]]:
    """A whole answer's tool calls in Ollama's shape (arguments as an object)."""
    if not isinstance(raw, list):
        return []
    calls = []
    for index, call in enumerate(raw):
        fn = _object(call, "a tool call").get("function")
        fn = _object(fn, "a tool call's function")
        name = fn.get("name")
        if not isinstance(name, str):
            raise ValueError("a tool call names no function")
        function = {
            "index": index,
            "name": name,
            "arguments": _arguments(fn.get("arguments"), name),
        }
        entry: dict[str, Any] = {"function": function}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        calls.append(entry)
    return calls


class Answer(Translation):
    """A chat or generate call's way back: a chat completion (``source`` chat) or a text
    completion (``source`` text) as Ollama's answer, under ``message`` (api/chat) or
    ``response`` (api/generate); its stream line by line as the upstream's events come."""

    answer_type = "application/json"
    stream_type = "application/x-ndjson"

    def __init__(self, model: str, key: str, source: str) -> None:
        self.model, self.key, self.source = model, key, source
        self.began = time.monotonic_ns()  # the request, before any wait for its model
        self.first: int | None = None  # the stream's first generated piece
        self.reader = EventReader()
        self.calls: dict[int, dict[str, str]] = {}  # a stream's tool calls, by index
        self.finish: str | None = None
        self.usage: Mapping[str, Any] = {}
        self.timings: Mapping[str, Any] = {}
        self.done = False

    # -- shapes --

    def _piece(
        self, text: str, thinking: str, calls: list[dict[str, Any]] | None
    ) -> dict[str, Any]:
        if self.key == "response":
            piece: dict[str, Any] = {"response": text}
            if thinking:
                piece["thinking"] = thinking
            return piece
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        return {"message": message}

    def _head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": created_at()}

    def _final(self) -> dict[str, Any]:
        """What Ollama's last object adds: why it ended, the counts, the durations (ns)."""
        end = time.monotonic_ns()
        load = int(self.load_s * 1e9)
        total = end - self.began
        prompt_ns = _ms_ns(self.timings.get("prompt_ms"))
        eval_ns = _ms_ns(self.timings.get("predicted_ms"))
        if prompt_ns is None or eval_ns is None:
            # Measured here: a stream's prompt ends with its first piece; a buffered answer
            # cannot tell prompt from generation, so all of it counts as generation.
            first = self.first if self.first is not None else end
            prompt_ns = max(0, first - self.began - load) if self.first is not None else 0
            eval_ns = max(0, end - first) if self.first is not None else max(0, total - load)
        final: dict[str, Any] = {
            "done": True,
            "done_reason": _FINISH.get(self.finish or "", "stop"),
            "total_duration": total,
            "load_duration": load,
        }
        prompt = _count(self.usage.get("prompt_tokens"))
        if prompt is None:
            prompt = _count(self.timings.get("prompt_n"))
        completion = _count(self.usage.get("completion_tokens"))
        if completion is None:
            completion = _count(self.timings.get("predicted_n"))
        if prompt is not None:
            final["prompt_eval_count"] = prompt
        final["prompt_eval_duration"] = prompt_ns
        if completion is not None:
            final["eval_count"] = completion
        final["eval_duration"] = eval_ns
        return final

    def _measures(self, data: Mapping[str, Any]) -> None:
        usage, timings = data.get("usage"), data.get("timings")
        if isinstance(usage, dict):
            self.usage = usage
        if isinstance(timings, dict):
            self.timings = timings

    # -- a whole answer --

    def answer(self, content: bytes) -> bytes:
        data = _object(loads(content), "the answer")
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise ValueError("the answer has no choices")
        choice = _object(choices[0], "a choice") if choices else {}
        self._measures(data)
        finish = choice.get("finish_reason")
        self.finish = finish if isinstance(finish, str) else None
        if self.source == "text":
            piece = self._piece(text_of(choice.get("text")), "", None)
        else:
            message = _object(choice.get("message") or {}, "the message")
            thinking = message.get("reasoning_content") or message.get("reasoning")
            calls = _calls_back(message.get("tool_calls"))
            piece = self._piece(text_of(message.get("content")), text_of(thinking), calls)
        return dumps({**self._head(), **piece, **self._final()})

    # -- a stream --

    def stream(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for _name, data in self.reader.feed(chunk):
            if self.done:
                continue  # after [DONE] or an error: nothing more is the client's
            if data.strip() == b"[DONE]":
                out.append(self._last())
                continue
            try:
                event = _object(loads(data), "an event")
            except ValueError:
                raise ValueError("an event that is not JSON") from None
            if "error" in event:
                out.append(_line({"error": _error_text(event["error"])}))
                self.done = True
                continue
            self._measures(event)
            out.extend(self._event(event))
        return b"".join(out)

    def _event(self, event: Mapping[str, Any]) -> list[bytes]:
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices:
            return []  # the usage-only chunk, a keep-alive
        choice = _object(choices[0], "a choice")
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self.finish = finish
        if self.source == "text":
            text, thinking = text_of(choice.get("text")), ""
        else:
            delta = _object(choice.get("delta") or {}, "a delta")
            text = text_of(delta.get("content"))
            thinking = text_of(delta.get("reasoning_content") or delta.get("reasoning"))
            self._call_pieces(delta.get("tool_calls"))
        out = []
        if text or thinking:
            if self.first is None:
                self.first = time.monotonic_ns()
            out.append(_line({**self._head(), **self._piece(text, thinking, None), "done": False}))
        if isinstance(finish, str) and self.calls:
            out.append(self._calls_line())
        return out

    def _call_pieces(self, raw: object) -> None:
        """A streamed tool call's pieces (its id and name first, its arguments' text in
        parts), kept by index until the call is whole."""
        if not isinstance(raw, list):
            return
        for piece in raw:
            piece = _object(piece, "a tool call")
            # Without an index (some servers): a piece with an id begins a call, the others
            # go on with the last one.
            last = max(self.calls, default=-1)
            index = piece.get("index", last + 1 if piece.get("id") or last < 0 else last)
            if not isinstance(index, int):
                raise ValueError("a tool call's index is not a number")
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(piece.get("id"), str):
                call["id"] = piece["id"]
            fn = piece.get("function")
            if isinstance(fn, dict):
                call["name"] += text_of(fn.get("name"))
                call["arguments"] += text_of(fn.get("arguments"))

    def _calls_line(self) -> bytes:
        calls = []
        for index in sorted(self.calls):
            call = self.calls[index]
            function = {
                "index": index,
                "name": call["name"],
                "arguments": _arguments(call["arguments"], call["name"]),
            }
            calls.append(
                {"id": call["id"], "function": function} if call["id"] else {"function": function}
            )
        self.calls = {}
        if self.first is None:
            self.first = time.monotonic_ns()
        return _line({**self._head(), **self._piece("", "", calls), "done": False})

    def _last(self) -> bytes:
        self.done = True
        pending = self._calls_line() if self.calls else b""
        return pending + _line({**self._head(), **self._piece("", "", None), **self._final()})

    def end(self) -> bytes:
        if self.reader.cut:
            raise ValueError("the upstream ended its stream in the middle of an event")
        return b"" if self.done else self._last()


def _error_text(error: object) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return error if isinstance(error, str) else "the upstream failed"


def _index(item: Mapping[str, Any]) -> int:
    index = item.get("index")
    return index if type(index) is int else 0


class Embeddings(Translation):
    """An embeddings answer as ``/api/embed``'s (every vector, the count, the durations) or,
    ``single``, as ``/api/embeddings``' (one vector)."""

    answer_type = "application/json"
    stream_type = "application/x-ndjson"

    def __init__(self, model: str, single: bool = False) -> None:
        self.model, self.single = model, single
        self.began = time.monotonic_ns()

    def answer(self, content: bytes) -> bytes:
        data = _object(loads(content), "the answer")
        items = data.get("data")
        if not isinstance(items, list):
            raise ValueError("the answer has no data")
        ranked = sorted((_object(item, "an embedding") for item in items), key=_index)
        vectors = [item.get("embedding") for item in ranked]
        if not all(isinstance(v, list) for v in vectors):
            raise ValueError("an embedding is not a list of numbers")
        if self.single:
            return dumps({"embedding": vectors[0] if vectors else []})
        answer: dict[str, Any] = {
            "model": self.model,
            "embeddings": vectors,
            "total_duration": time.monotonic_ns() - self.began,
            "load_duration": int(self.load_s * 1e9),
        }
        usage = data.get("usage")
        prompt = _count(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
        if prompt is not None:
            answer["prompt_eval_count"] = prompt
        return dumps(answer)

    def stream(self, chunk: bytes) -> bytes:
        raise ValueError("an embeddings answer is not a stream")

    def end(self) -> bytes:
        return b""
