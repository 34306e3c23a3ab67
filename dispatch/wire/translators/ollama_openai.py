"""Ollama's own API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``)
served by a slot that speaks OpenAI's: the request turned into chat/completions, completions
or embeddings, and the answer back into Ollama's shapes (docs/api.md in ollama/ollama).

What differs, and how it is bridged:

- Ollama streams unless told ``"stream": false`` (a body without ``stream`` streams); its
  stream is NDJSON, one object a line, the last with ``done: true``, the token counts and the
  durations in nanoseconds. The upstream is asked for its usage in the stream
  (``stream_options.include_usage``) so the counts are its own; the durations are measured
  here (or the server's ``timings``, llama.cpp's, when it sends them).
- A tool call's ``arguments`` is an object in Ollama, a JSON string in OpenAI. A streamed
  call arrives in pieces: those pieces (only they) are held until the call is whole.
- ``images`` are base64 strings on a message; OpenAI takes them as ``image_url`` data URIs.
- ``format`` ("json", or a JSON schema) is OpenAI's ``response_format``; ``options`` are
  sampling parameters (``num_predict`` is ``max_tokens``; ``num_ctx`` is the server's to set,
  not a request's: dropped); ``think`` asks the chat template to think (or not), and the
  server's ``reasoning_content`` comes back as ``thinking``.
- ``/api/generate`` is a user message (after its ``system``); with ``raw`` (the prompt is
  already templated) or a ``suffix`` (fill in the middle) it goes to completions where the
  slot offers them.

``keep_alive`` is checked (Ollama's 400 for a duration it cannot read) and not sent: loading
and unloading belong to hal0web (dispatch/api/ollama_loads.py answers the requests that
only load or unload). Pure: no Django, no I/O (the clock is read for the durations).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeGuard

import orjson

from dispatch.wire.adapters import ClientRequest, Outgoing, Translation
from dispatch.wire.errors import ApiError, dumps
from dispatch.wire.framing import EventReader

CHAT, GENERATE, EMBED, EMBEDDINGS = "api/chat", "api/generate", "api/embed", "api/embeddings"

_ROLES = ("system", "user", "assistant", "tool")
# Ollama's sampling options sent as the OpenAI-compatible servers name them.
_FLOAT_OPTIONS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INT_OPTIONS = ("top_k", "seed")
_EFFORTS = ("low", "medium", "high")
# A Go duration (Ollama's keep_alive as text): "5m", "1h30m", "0", "-1s", "2.5s".
_DURATION_PART = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)?")
_DURATION = re.compile(r"(?:-?\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h)?)+")
# Image types by their first bytes, for the data URI.
_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF8", "image/gif"),
    (b"BM", "image/bmp"),
)
_FINISH = {"length": "length"}  # everything else (stop, tool_calls, content_filter): stop


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request_error", message, param)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- keep_alive -------------------------------------------------------------------------------


def keep_alive_zero(value: object) -> bool:
    """Whether ``keep_alive`` says "unload now" (0, "0", "0s", "0m"). A value Ollama could
    not read raises its 400."""
    if value is None:
        return False
    if _number(value):
        return value == 0
    if isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        return all(float(n) == 0 for n, _ in _DURATION_PART.findall(value.strip()))
    raise _bad(
        f"keep_alive must be a number of seconds or a duration such as '5m', not {value!r}.",
        "keep_alive",
    )


# --- the request ------------------------------------------------------------------------------


def _data(request: ClientRequest) -> dict[str, Any]:
    data = request.body.json()
    if not isinstance(data, dict):  # the pipeline parsed it: only a test sends otherwise
        raise _bad("The request body must be a JSON object.")
    keep_alive_zero(data.get("keep_alive"))
    return data


def _string(data: Mapping[str, Any], key: str, where: str = "") -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _bad(f"`{where}{key}` must be a string.", where + key)


def _sampling(data: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's ``options`` as OpenAI's sampling parameters."""
    options = data.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise _bad("`options` must be an object.", "options")
    out: dict[str, Any] = {}
    for name in (*_FLOAT_OPTIONS, *_INT_OPTIONS):
        value = options.get(name)
        if value is None:
            continue
        if not _number(value) or (name in _INT_OPTIONS and not float(value).is_integer()):
            kind = "an integer" if name in _INT_OPTIONS else "a number"
            raise _bad(f"options.{name} must be {kind}.", f"options.{name}")
        out[name] = int(value) if name in _INT_OPTIONS else value
    predict = options.get("num_predict")
    if predict is not None:
        if not _number(predict) or not float(predict).is_integer():
            raise _bad("options.num_predict must be an integer.", "options.num_predict")
        if predict > 0:  # -1 (no limit) and -2 (fill the context) are the server's default
            out["max_tokens"] = int(predict)
    stop = options.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("options.stop must be a string or a list of strings.", "options.stop")
        if stop:
            out["stop"] = stop
    return out


def _extras(data: Mapping[str, Any]) -> dict[str, Any]:
    """``format`` and ``think``, as OpenAI-compatible servers take them."""
    out: dict[str, Any] = {}
    fmt = data.get("format")
    if fmt == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": fmt},
        }
    elif fmt not in (None, ""):
        raise _bad('`format` must be "json" or a JSON schema object.', "format")
    think = data.get("think")
    if isinstance(think, bool):
        # llama.cpp and vLLM hand these to the model's chat template (Qwen3, DeepSeek...).
        out["chat_template_kwargs"] = {"enable_thinking": think}
    elif think in _EFFORTS:
        out["reasoning_effort"] = think
        out["chat_template_kwargs"] = {"enable_thinking": True}
    elif think is not None:
        raise _bad('`think` must be true, false, "low", "medium" or "high".', "think")
    return out


def _image_url(image: object, where: str) -> dict[str, Any]:
    """One base64 image as an OpenAI image part (a data URI; its type read from its bytes)."""
    if not isinstance(image, str) or not image:
        raise _bad(f"{where} must be base64-encoded image data.", where)
    if image.startswith("data:"):
        url = image
    else:
        try:  # checked whole: the server would refuse it with less to say
            head = base64.b64decode(image, validate=True)[:12]
        except (binascii.Error, ValueError):
            raise _bad(f"{where} is not base64-encoded data.", where) from None
        webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        kind = "image/webp" if webp else next((t for m, t in _MAGIC if head.startswith(m)), None)
        url = f"data:{kind or 'image/png'};base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _images(raw: object, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(f"{where} must be a list of base64-encoded images.", where)
    return [_image_url(image, f"{where}[{i}]") for i, image in enumerate(raw)]


def _with_images(text: str, images: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    return [{"type": "text", "text": text}, *images] if images else text


def _calls_sent(raw: object, where: str, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls (Ollama's: arguments as an object) in OpenAI's
    shape (arguments as JSON text, each call with an id)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(f"{where} must be a list.", where)
    calls = []
    for j, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{where}[{j}] must be {{'function': {{'name': ..., 'arguments': {{}}}}}}.")
        args = fn.get("arguments")
        text = args if isinstance(args, str) else dumps({} if args is None else args).decode()
        given = call.get("id")
        call_id = given if isinstance(given, str) and given else f"call_{i}_{j}"
        calls.append(
            {"id": call_id, "type": "function", "function": {"name": fn["name"], "arguments": text}}
        )
    return calls


def _answered_call(message: Mapping[str, Any], pending: list[tuple[str, str]], i: int) -> str:
    """The id of the call a tool message answers: its own ``tool_call_id``, else the oldest
    unanswered call of its ``tool_name``, else the oldest unanswered call (Ollama's tool
    messages name the tool, OpenAI's the call)."""
    given = message.get("tool_call_id")
    if isinstance(given, str) and given:
        return given
    name = message.get("tool_name") or message.get("name")
    for k, (_id, call_name) in enumerate(pending):
        if call_name == name:
            return pending.pop(k)[0]
    return pending.pop(0)[0] if pending else f"call_tool_{i}"


def _messages(raw: object) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("`messages` must be a list.", "messages")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object.", where)
        role = message.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_ROLES)}.", f"{where}.role")
        text = _string(message, "content", f"{where}.") or ""
        images = _images(message.get("images"), f"{where}.images")
        if images and role != "user":
            raise _bad(f"{where}: images are taken on user messages only.", f"{where}.images")
        sent: dict[str, Any] = {"role": role, "content": _with_images(text, images)}
        if role == "assistant":
            calls = _calls_sent(message.get("tool_calls"), f"{where}.tool_calls", i)
            if calls:
                sent["tool_calls"] = calls
                pending = [(c["id"], c["function"]["name"]) for c in calls]
        elif role == "tool":
            sent["tool_call_id"] = _answered_call(message, pending, i)
        out.append(sent)
    return out


def _tools(raw: object) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("`tools` must be a list.", "tools")
    tools = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.")
        tools.append({**tool, "type": "function"})
    return tools


def _common(data: Mapping[str, Any], upstream_model: str | None) -> dict[str, Any]:
    """What every generating request sends: the model, the stream flag (Ollama's default is
    to stream), the upstream's usage asked for in a stream, sampling, format and think."""
    streams = data.get("stream") is not False  # absent or null: a stream
    body: dict[str, Any] = {}
    model = upstream_model if upstream_model is not None else data.get("model")
    if isinstance(model, str):
        body["model"] = model
    body["stream"] = streams
    if streams:
        body["stream_options"] = {"include_usage": True}
    body.update(_sampling(data))
    body.update(_extras(data))
    return body


def _asked_model(data: Mapping[str, Any], upstream_model: str | None) -> str:
    """The name the answer gives: the client's own (Ollama answers with the name asked)."""
    model = data.get("model")
    return model if isinstance(model, str) else upstream_model or ""


def chat(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """``/api/chat`` as chat/completions."""
    data = _data(request)
    body = _common(data, upstream_model)
    body["messages"] = _messages(data.get("messages"))
    tools = _tools(data.get("tools"))
    if tools:
        body["tools"] = tools
    answer = Answer(_asked_model(data, upstream_model), "message", "chat")
    return Outgoing("chat/completions", dumps(body), answer)


def generate(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """``/api/generate``: a user message to chat/completions; completions for a raw prompt or
    one with a suffix, where the slot offers them (or where it offers nothing else)."""
    data = _data(request)
    prompt = _string(data, "prompt") or ""
    system = _string(data, "system")
    suffix = _string(data, "suffix")
    images = _images(data.get("images"), "images")
    offers = request.offers
    text_wanted = data.get("raw") is True or bool(suffix)
    to_text = "chat/completions" not in offers or (text_wanted and "completions" in offers)
    body = _common(data, upstream_model)
    model = _asked_model(data, upstream_model)
    if not to_text:
        if suffix:
            raise _bad(
                "`suffix` (fill in the middle) needs a slot that offers completions; "
                "this model's slot offers chat only.",
                "suffix",
            )
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": _with_images(prompt, images)})
        body["messages"] = messages
        return Outgoing("chat/completions", dumps(body), Answer(model, "response", "chat"))
    if images:
        raise _bad("`images` need a slot that offers chat, not completions only.", "images")
    body.pop("chat_template_kwargs", None)  # no template is applied to a completion
    body.pop("reasoning_effort", None)
    # Without a chat template, the system prompt goes first (a raw prompt is sent as it is).
    body["prompt"] = prompt if data.get("raw") is True or not system else f"{system}\n\n{prompt}"
    if suffix:
        body["suffix"] = suffix
    return Outgoing("completions", dumps(body), Answer(model, "response", "text"))


def embed(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """``/api/embed`` (a text or a list of them) as embeddings."""
    data = _data(request)
    given = data.get("input")
    if not (
        isinstance(given, str)
        or (isinstance(given, list) and all(isinstance(t, str) for t in given))
    ):
        raise _bad("`input` must be a string or a list of strings.", "input")
    body: dict[str, Any] = {"model": upstream_model or data.get("model"), "input": given}
    dimensions = data.get("dimensions")
    if dimensions is not None:
        if not _number(dimensions) or not float(dimensions).is_integer() or dimensions < 1:
            raise _bad("`dimensions` must be a positive integer.", "dimensions")
        body["dimensions"] = int(dimensions)
    return Outgoing("embeddings", dumps(body), Embeddings(_asked_model(data, upstream_model)))


def embeddings(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """``/api/embeddings`` (the older one: one ``prompt``, one ``embedding``) as embeddings."""
    data = _data(request)
    prompt = _string(data, "prompt") or ""
    body = {"model": upstream_model or data.get("model"), "input": prompt}
    return Outgoing("embeddings", dumps(body), Embeddings(_asked_model(data, upstream_model), True))


# --- the answer -------------------------------------------------------------------------------


def created_at() -> str:
    """Now, as Ollama writes ``created_at`` (RFC 3339, UTC)."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _line(data: Mapping[str, Any]) -> bytes:
    return dumps(data) + b"\n"


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _ms_ns(value: object) -> int | None:
    return int(value * 1_000_000) if _number(value) and value >= 0 else None


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
        value = orjson.loads(text) if isinstance(text, str) else None
    except orjson.JSONDecodeError:
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


def _text_of(value: object) -> str:
    return value if isinstance(value, str) else ""


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
        data = _object(orjson.loads(content), "the answer")
        choices = data.get("choices")
        if not isinstance(choices, list):
            raise ValueError("the answer has no choices")
        choice = _object(choices[0], "a choice") if choices else {}
        self._measures(data)
        finish = choice.get("finish_reason")
        self.finish = finish if isinstance(finish, str) else None
        if self.source == "text":
            piece = self._piece(_text_of(choice.get("text")), "", None)
        else:
            message = _object(choice.get("message") or {}, "the message")
            thinking = message.get("reasoning_content") or message.get("reasoning")
            calls = _calls_back(message.get("tool_calls"))
            piece = self._piece(_text_of(message.get("content")), _text_of(thinking), calls)
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
                event = _object(orjson.loads(data), "an event")
            except orjson.JSONDecodeError:
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
            text, thinking = _text_of(choice.get("text")), ""
        else:
            delta = _object(choice.get("delta") or {}, "a delta")
            text = _text_of(delta.get("content"))
            thinking = _text_of(delta.get("reasoning_content") or delta.get("reasoning"))
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
            index = piece.get("index", len(self.calls))
            if not isinstance(index, int):
                raise ValueError("a tool call's index is not a number")
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(piece.get("id"), str):
                call["id"] = piece["id"]
            fn = piece.get("function")
            if isinstance(fn, dict):
                call["name"] += _text_of(fn.get("name"))
                call["arguments"] += _text_of(fn.get("arguments"))

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
        data = _object(orjson.loads(content), "the answer")
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


# (endpoint called, endpoint offered, adapter): a slot offering chat and completions is
# sent /api/generate by the first that fits (the adapter picks between them by the request).
ADAPTERS = (
    (CHAT, "chat/completions", chat),
    (GENERATE, "chat/completions", generate),
    (GENERATE, "completions", generate),
    (EMBED, "embeddings", embed),
    (EMBEDDINGS, "embeddings", embeddings),
)
