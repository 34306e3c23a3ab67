"""Ollama's own API (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/embeddings``)
served by a slot that speaks OpenAI's: the request turned into chat/completions, completions
or embeddings (docs/api.md in ollama/ollama); the answer goes back into Ollama's shapes by
``ollama_from_openai``.

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
only load or unload). Pure: no Django, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from dispatch.wire.adapters import ClientRequest, Outgoing
from dispatch.wire.errors import dumps, invalid_request
from dispatch.wire.translators.ollama_from_openai import Answer, Embeddings
from dispatch.wire.translators.values import is_number

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


# --- keep_alive -------------------------------------------------------------------------------


def keep_alive_zero(value: object) -> bool:
    """Whether ``keep_alive`` says "unload now" (0, "0", "0s", "0m"). A value Ollama could
    not read raises its 400."""
    if value is None:
        return False
    if is_number(value):
        return value == 0
    if isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        return all(float(n) == 0 for n, _ in _DURATION_PART.findall(value.strip()))
    raise invalid_request(
        f"keep_alive must be a number of seconds or a duration such as '5m', not {value!r}.",
        "keep_alive",
    )


# --- the request ------------------------------------------------------------------------------


def _data(request: ClientRequest) -> dict[str, Any]:
    data = request.body.json()
    if not isinstance(data, dict):  # the pipeline parsed it: only a test sends otherwise
        raise invalid_request("The request body must be a JSON object.")
    keep_alive_zero(data.get("keep_alive"))
    return data


def _string(data: Mapping[str, Any], key: str, where: str = "") -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise invalid_request(f"`{where}{key}` must be a string.", where + key)


def _sampling(data: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's ``options`` as OpenAI's sampling parameters."""
    options = data.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise invalid_request("`options` must be an object.", "options")
    out: dict[str, Any] = {}
    for name in (*_FLOAT_OPTIONS, *_INT_OPTIONS):
        value = options.get(name)
        if value is None:
            continue
        if not is_number(value) or (name in _INT_OPTIONS and not float(value).is_integer()):
            kind = "an integer" if name in _INT_OPTIONS else "a number"
            raise invalid_request(f"options.{name} must be {kind}.", f"options.{name}")
        out[name] = int(value) if name in _INT_OPTIONS else value
    predict = options.get("num_predict")
    if predict is not None:
        if not is_number(predict) or not float(predict).is_integer():
            raise invalid_request("options.num_predict must be an integer.", "options.num_predict")
        if predict > 0:  # -1 (no limit) and -2 (fill the context) are the server's default
            out["max_tokens"] = int(predict)
    stop = options.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise invalid_request(
                "options.stop must be a string or a list of strings.", "options.stop"
            )
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
        raise invalid_request('`format` must be "json" or a JSON schema object.', "format")
    think = data.get("think")
    if isinstance(think, bool):
        # llama.cpp and vLLM hand these to the model's chat template (Qwen3, DeepSeek...).
        out["chat_template_kwargs"] = {"enable_thinking": think}
    elif think in _EFFORTS:
        out["reasoning_effort"] = think
        out["chat_template_kwargs"] = {"enable_thinking": True}
    elif think is not None:
        raise invalid_request('`think` must be true, false, "low", "medium" or "high".', "think")
    return out


def _image_url(image: object, where: str) -> dict[str, Any]:
    """One base64 image as an OpenAI image part (a data URI; its type read from its bytes)."""
    if not isinstance(image, str) or not image:
        raise invalid_request(f"{where} must be base64-encoded image data.", where)
    if image.startswith("data:"):
        url = image
    else:
        try:  # checked whole: the server would refuse it with less to say
            head = base64.b64decode(image, validate=True)[:12]
        except (binascii.Error, ValueError):
            raise invalid_request(f"{where} is not base64-encoded data.", where) from None
        webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
        kind = "image/webp" if webp else next((t for m, t in _MAGIC if head.startswith(m)), None)
        url = f"data:{kind or 'image/png'};base64,{image}"
    return {"type": "image_url", "image_url": {"url": url}}


def _images(raw: object, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid_request(f"{where} must be a list of base64-encoded images.", where)
    return [_image_url(image, f"{where}[{i}]") for i, image in enumerate(raw)]


def _with_images(text: str, images: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    return [{"type": "text", "text": text}, *images] if images else text


def _calls_sent(raw: object, where: str, i: int) -> list[dict[str, Any]]:
    """An assistant message's tool calls (Ollama's: arguments as an object) in OpenAI's
    shape (arguments as JSON text, each call with an id)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise invalid_request(f"{where} must be a list.", where)
    calls = []
    for j, call in enumerate(raw):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid_request(
                f"{where}[{j}] must be {{'function': {{'name': ..., 'arguments': {{}}}}}}."
            )
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
        raise invalid_request("`messages` must be a list.", "messages")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid_request(f"{where} must be an object.", where)
        role = message.get("role")
        if role not in _ROLES:
            raise invalid_request(
                f"{where}.role must be one of {', '.join(_ROLES)}.", f"{where}.role"
            )
        text = _string(message, "content", f"{where}.") or ""
        images = _images(message.get("images"), f"{where}.images")
        if images and role != "user":
            raise invalid_request(
                f"{where}: images are taken on user messages only.", f"{where}.images"
            )
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
        raise invalid_request("`tools` must be a list.", "tools")
    tools = []
    for i, tool in enumerate(raw):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid_request(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}."
            )
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
            raise invalid_request(
                "`suffix` (fill in the middle) needs a slot that offers completions; "
                "this model's slot offers chat only.",
                "suffix",
            )
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": _with_images(prompt, images)})
        body["messages"] = messages
        return Outgoing("chat/completions", dumps(body), Answer(model, "response", "chat"))
    if images:
        raise invalid_request(
            "`images` need a slot that offers chat, not completions only.", "images"
        )
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
        raise invalid_request("`input` must be a string or a list of strings.", "input")
    body: dict[str, Any] = {"model": upstream_model or data.get("model"), "input": given}
    dimensions = data.get("dimensions")
    if dimensions is not None:
        if not is_number(dimensions) or not float(dimensions).is_integer() or dimensions < 1:
            raise invalid_request("`dimensions` must be a positive integer.", "dimensions")
        body["dimensions"] = int(dimensions)
    return Outgoing("embeddings", dumps(body), Embeddings(_asked_model(data, upstream_model)))


def embeddings(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """``/api/embeddings`` (the older one: one ``prompt``, one ``embedding``) as embeddings."""
    data = _data(request)
    prompt = _string(data, "prompt") or ""
    body = {"model": upstream_model or data.get("model"), "input": prompt}
    return Outgoing("embeddings", dumps(body), Embeddings(_asked_model(data, upstream_model), True))


# (endpoint called, endpoint offered, adapter): a slot offering chat and completions is
# sent /api/generate by the first that fits (the adapter picks between them by the request).
ADAPTERS = (
    (CHAT, "chat/completions", chat),
    (GENERATE, "chat/completions", generate),
    (GENERATE, "completions", generate),
    (EMBED, "embeddings", embed),
    (EMBEDDINGS, "embeddings", embeddings),
)
