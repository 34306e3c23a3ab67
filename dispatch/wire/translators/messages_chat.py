"""Anthropic Messages served by a slot that offers only Chat Completions (llama-cpp-python,
FastFlowLM, older vLLM, Ollama and Lemonade): the request said again as a chat completion
(here), and the answer, or the stream event by event, said back as a message
(``messages_from_chat``).

What crosses, and how (Anthropic's "Messages" API reference against OpenAI's "Chat"):

- ``system`` (a string or text blocks), and ``role: "system"`` entries in ``messages``
  (Claude Code sends them): the leading ones make the one system message; a later one is
  said as user text where it stands, since most local models' chat templates refuse a
  system message past the first (Qwen's, Gemma's), and hoisting it would change the prompt's
  prefix and cost the server its prompt cache on every turn.
- text, image (base64 → a ``data:`` URL, url → its URL) and text ``document`` blocks; an
  assistant's ``tool_use`` → ``tool_calls`` (arguments: the input as JSON); a user's
  ``tool_result`` → a ``role: "tool"`` message (its text; an error's marked as one; its
  images go on the user message that follows, which is where Chat takes images).
- ``tools`` (custom tools; Anthropic's server tools are dropped), ``tool_choice`` (auto,
  any → required, none; a named tool → that tool alone, required: servers that take only
  the three words still call it), ``stop_sequences`` → ``stop``, ``max_tokens``,
  ``temperature``, ``top_p``, ``top_k``, ``metadata.user_id`` → ``user``, ``stream`` (with
  ``stream_options.include_usage`` for the counts).
- ``thinking`` → ``chat_template_kwargs.enable_thinking`` (what llama.cpp, vLLM and SGLang
  pass to the chat template); the server's ``reasoning_content`` comes back as thinking
  blocks, only when asked for (a client that did not ask reads ``content[0].text``).
- Dropped: ``cache_control``, thinking blocks of earlier turns (Anthropic drops them too),
  other block types, and every field not named here (betas: ``context_management``,
  ``output_config``...), so none of them is an upstream's 400.

``/v1/messages/count_tokens`` on such a slot asks the server's tokenizer (llama.cpp's and
vLLM's ``POST /tokenize``, from the server's root) to count the prompt's text; a server
without one (its refusal, any status) gets an estimate, flagged ``"hal0_estimate": true``.
It asks rather than guessing by kind: llama.cpp's kind also covers llama-cpp-python, which
has no ``/tokenize``, and a refusal costs one round trip to a local server.

A body the translator cannot read is a 400 ``invalid_request_error`` naming the field.
Pure: no Django, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from dispatch.lib.json_reader import loads
from dispatch.wire.adapters import ClientRequest, Outgoing, Translation
from dispatch.wire.errors import ApiError, dumps, invalid_request
from dispatch.wire.translators.messages_from_chat import MessagesFromChat, content_text
from dispatch.wire.translators.values import is_integer, is_number

Json = dict[str, Any]

# Claude Code puts its client version and a per-conversation hash in a first system block;
# it is billing metadata for Anthropic's API, not a prompt, and at the very start of the
# prompt it would cost a local server its prompt cache across conversations.
_BILLING = "x-anthropic-billing-header:"


def _invalid(where: str, what: str) -> ApiError:
    return invalid_request(f"{where}: {what}", where)


# --- the request: a message said as a chat completion ----------------------------------------


def _blocks(content: Any, where: str) -> list[Json]:
    """A message's content as blocks: a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _invalid(where, "expected a string or a list of content blocks")
    for i, block in enumerate(content):
        if not isinstance(block, dict):
            raise _invalid(f"{where}.{i}", "expected a content block (an object)")
    return content


def _text(block: Json, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _invalid(f"{where}.text", "expected a string")
    return text


def _texts(content: Any, where: str) -> list[str]:
    """The text blocks of a system prompt or a tool result (other blocks are not text)."""
    blocks = _blocks(content, where)
    return [_text(b, f"{where}.{i}") for i, b in enumerate(blocks) if b.get("type") == "text"]


def _image(block: Json, where: str) -> Json | None:
    """An image block as Chat's ``image_url`` part (None: a source Chat cannot carry, a file
    id of Anthropic's Files API)."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise _invalid(f"{where}.source", "expected an image source (an object)")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise _invalid(f"{where}.source", "a base64 source takes media_type and data strings")
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str):
            raise _invalid(f"{where}.source.url", "expected a string")
        return {"type": "image_url", "image_url": {"url": url}}
    return None


def _document(block: Json, where: str) -> Json | None:
    """A document's text (a PDF or a file id has none a Chat server could read)."""
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "text":
        data = source.get("data")
        if not isinstance(data, str):
            raise _invalid(f"{where}.source.data", "expected a string")
        return {"type": "text", "text": data}
    if isinstance(source, dict) and source.get("type") == "content":
        text = "\n".join(_texts(source.get("content"), f"{where}.source.content"))
        return {"type": "text", "text": text}
    return None


def _tool_call(block: Json, where: str) -> Json:
    """An assistant's ``tool_use`` block as a Chat tool call."""
    call_id, name = block.get("id"), block.get("name")
    if not isinstance(call_id, str):
        raise _invalid(f"{where}.id", "expected a string")
    if not isinstance(name, str):
        raise _invalid(f"{where}.name", "expected a string")
    arguments = dumps(block.get("input") or {}).decode()
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class _Conversation:
    """Anthropic's messages said as Chat's, in order: tool results become tool messages
    right after the assistant's calls, consecutive turns of one role become one (Anthropic
    joins them; many chat templates insist roles alternate)."""

    def __init__(self, system: list[str]) -> None:
        self.system = system
        self.out: list[Json] = []
        # User content waiting for the next user turn: a system entry said after an
        # assistant's turn must not come between its tool calls and their results.
        self.pending: list[Json] = []

    def add(self, message: Any, where: str) -> None:
        if not isinstance(message, dict):
            raise _invalid(where, "expected a message (an object)")
        role = message.get("role")
        content = message.get("content")
        if role == "user":
            self._user(_blocks(content, f"{where}.content"), f"{where}.content")
        elif role == "assistant":
            self._assistant(_blocks(content, f"{where}.content"), f"{where}.content")
        elif role == "system":
            self._system("\n".join(_texts(content, f"{where}.content")))
        else:
            raise _invalid(f"{where}.role", "expected 'user' or 'assistant'")

    def messages(self) -> list[Json]:
        self._add_user([])
        head = [{"role": "system", "content": "\n".join(self.system)}] if self.system else []
        return head + [_plain(m) for m in self.out]

    def _system(self, text: str) -> None:
        if not self.out and not self.pending:
            self.system.append(text)
        elif self.out and self.out[-1]["role"] == "user" and not self.pending:
            self.out[-1]["content"].append({"type": "text", "text": text})
        else:
            self.pending.append({"type": "text", "text": text})

    def _user(self, blocks: list[Json], where: str) -> None:
        parts: list[Json] = []
        for i, block in enumerate(blocks):
            at = f"{where}.{i}"
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": _text(block, at)})
            elif kind == "image":
                parts.extend(p for p in (_image(block, at),) if p is not None)
            elif kind == "document":
                parts.extend(p for p in (_document(block, at),) if p is not None)
            elif kind == "tool_result":
                self._tool_result(block, at, parts)
        self._add_user(parts)

    def _tool_result(self, block: Json, where: str, parts: list[Json]) -> None:
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str):
            raise _invalid(f"{where}.tool_use_id", "expected a string")
        content = block.get("content")
        blocks = [] if content is None else _blocks(content, f"{where}.content")
        texts: list[str] = []
        for i, b in enumerate(blocks):
            if b.get("type") == "text":
                texts.append(_text(b, f"{where}.content.{i}"))
            elif b.get("type") == "image":  # Chat's tool messages carry text only
                parts.extend(p for p in (_image(b, f"{where}.content.{i}"),) if p is not None)
        text = "\n".join(texts)
        if block.get("is_error") is True:
            text = f"Error: {text}"
        self.out.append({"role": "tool", "tool_call_id": call_id, "content": text})

    def _add_user(self, parts: list[Json]) -> None:
        parts, self.pending = self.pending + parts, []
        if not parts:
            return
        if self.out and self.out[-1]["role"] == "user":
            self.out[-1]["content"].extend(parts)
        else:
            self.out.append({"role": "user", "content": parts})

    def _assistant(self, blocks: list[Json], where: str) -> None:
        self._add_user([])
        texts: list[str] = []
        calls: list[Json] = []
        for i, block in enumerate(blocks):
            if block.get("type") == "text":
                texts.append(_text(block, f"{where}.{i}"))
            elif block.get("type") == "tool_use":
                calls.append(_tool_call(block, f"{where}.{i}"))
        if not texts and not calls:
            return  # thinking only: earlier turns' thinking is not sent again
        if self.out and self.out[-1]["role"] == "assistant" and not self.out[-1].get("tool_calls"):
            last = self.out[-1]
            last["content"] = "\n".join(t for t in (last["content"], *texts) if t)
        else:
            self.out.append({"role": "assistant", "content": "\n".join(texts)})
        if calls:
            self.out[-1]["tool_calls"] = calls


def _plain(message: Json) -> Json:
    """A user message whose parts are all text, as one string: what every Chat server and
    chat template takes (an array of parts only where an image needs one)."""
    parts = message.get("content")
    if message["role"] == "user" and all(p["type"] == "text" for p in parts or ()):
        return {**message, "content": "\n".join(p["text"] for p in parts or ())}
    return message


def _system_texts(system: Any) -> list[str]:
    if system is None:
        return []
    texts = _texts(system, "system")
    return [t for t in texts if not t.startswith(_BILLING)]


def _tools(tools: Any) -> list[Json]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _invalid("tools", "expected a list of tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _invalid(f"tools.{i}", "expected a tool (an object)")
        if tool.get("type") not in (None, "custom"):
            continue  # one of Anthropic's own tools (web search, code execution...)
        name = tool.get("name")
        if not isinstance(name, str):
            raise _invalid(f"tools.{i}.name", "expected a string")
        schema = tool.get("input_schema")
        function: Json = {
            "name": name,
            "parameters": schema if isinstance(schema, dict) else {"type": "object"},
        }
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, tools: list[Json], chat: Json) -> None:
    if choice is None or not tools:
        return
    if not isinstance(choice, dict):
        raise _invalid("tool_choice", "expected an object")
    kind = choice.get("type")
    if kind == "tool":
        name = choice.get("name")
        named = [t for t in tools if t["function"]["name"] == name]
        if not isinstance(name, str) or not named:
            raise _invalid("tool_choice.name", "expected the name of one of the tools")
        chat["tools"], chat["tool_choice"] = named, "required"
    elif kind in ("auto", "any", "none"):
        chat["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    else:
        raise _invalid("tool_choice.type", "expected 'auto', 'any', 'tool' or 'none'")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


# field -> (the Chat field it becomes, the test its value must pass, what it must be)
_SCALARS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "max_tokens": ("max_tokens", is_integer, "an integer"),
    "temperature": ("temperature", is_number, "a number"),
    "top_p": ("top_p", is_number, "a number"),
    "top_k": ("top_k", is_integer, "an integer"),
}


def _options(body: Json, chat: Json) -> None:
    """The sampling fields, the stop sequences and the caller's id."""
    for name, (to, valid, kind) in _SCALARS.items():
        value = body.get(name)
        if value is not None:
            if not valid(value):
                raise _invalid(name, f"expected {kind}")
            chat[to] = value
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _invalid("stop_sequences", "expected a list of strings")
        if stops:
            chat["stop"] = stops
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _invalid("metadata", "expected an object")
        if isinstance(metadata.get("user_id"), str):
            chat["user"] = metadata["user_id"]


def _thinking(body: Json, chat: Json) -> bool:
    """Whether the client asked for thinking (its blocks come back then), told to the
    server's chat template as llama.cpp and vLLM take it."""
    thinking = body.get("thinking")
    if thinking is None:
        return False
    if not isinstance(thinking, dict):
        raise _invalid("thinking", "expected an object")
    wanted = thinking.get("type") in ("enabled", "adaptive")
    if wanted or thinking.get("type") == "disabled":
        chat["chat_template_kwargs"] = {"enable_thinking": wanted}
    return wanted


def to_chat(body: Json, upstream_model: str | None) -> tuple[Json, bool]:
    """A Messages request body as a Chat Completions one, and whether thinking was asked
    for. Raises ApiError (400) for a body it cannot read."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("messages", "expected a list of messages")
    conversation = _Conversation(_system_texts(body.get("system")))
    for i, message in enumerate(messages):
        conversation.add(message, f"messages.{i}")
    model = upstream_model if upstream_model is not None else body.get("model")
    chat: Json = {"model": model, "messages": conversation.messages()}
    _options(body, chat)
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
        _tool_choice(body.get("tool_choice"), tools, chat)
    thinking = _thinking(body, chat)
    if body.get("stream") is True:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat, thinking


# --- count_tokens: the server's tokenizer, else an estimate ----------------------------------


def _prompt_text(chat: Json) -> str:
    """The prompt's words as one text: what a tokenizer counts (the chat template's few
    tokens of its own are not in it)."""
    pieces: list[str] = []
    for message in chat["messages"]:
        content = message.get("content")
        pieces.append(content_text(content))
        for call in message.get("tool_calls", ()):
            pieces += [call["function"]["name"], call["function"]["arguments"]]
    if chat.get("tools"):
        pieces.append(dumps(chat["tools"]).decode())
    return "\n".join(p for p in pieces if p)


def estimate(text: str, messages: int) -> int:
    """About four characters a token (English text and code, the usual rule of thumb), and
    a few tokens a message for its role markers."""
    return math.ceil(len(text) / 4) + 4 * messages


class TokenCount(Translation):
    """count_tokens' way back: the tokenizer's tokens counted, or the estimate when the
    server has no tokenizer (it refused) or answered in a shape not known here."""

    def __init__(self, estimated: int) -> None:
        self.estimated = estimated

    def _estimate(self) -> bytes:
        return dumps({"input_tokens": self.estimated, "hal0_estimate": True})

    def answer(self, content: bytes) -> bytes:
        try:
            data = loads(content)
        except ValueError:
            return self._estimate()
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if isinstance(tokens, list):  # llama.cpp's and vLLM's /tokenize
            return dumps({"input_tokens": len(tokens)})
        return self._estimate()

    def refused(self, status: int, content: bytes) -> bytes | None:
        return self._estimate()

    def stream(self, chunk: bytes) -> bytes:
        raise ValueError("a token count is not a stream")

    def end(self) -> bytes:
        return b""


def _count_tokens(body: Json, upstream_model: str | None) -> Outgoing:
    chat, _ = to_chat(body, upstream_model)
    text = _prompt_text(chat)
    # llama.cpp reads "content"; vLLM "prompt"; a router (llama.cpp's) routes by "model".
    ask = {"model": chat["model"], "content": text, "prompt": text}
    return Outgoing("/tokenize", dumps(ask), TokenCount(estimate(text, len(chat["messages"]))))


def adapt(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """A Messages call (or its count_tokens) for a slot that offers Chat Completions."""
    body = request.body.json()
    if not isinstance(body, dict):
        raise _invalid("body", "expected a JSON object")
    if request.path.rstrip("/").endswith("/count_tokens"):
        return _count_tokens(body, upstream_model)
    chat, thinking = to_chat(body, upstream_model)
    back = MessagesFromChat(body.get("model"), thinking, streamed=body.get("stream") is True)
    return Outgoing("chat/completions", dumps(chat), back)


ADAPTERS = (("messages", "chat/completions", adapt),)
