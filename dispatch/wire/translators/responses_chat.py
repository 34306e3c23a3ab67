"""OpenAI Responses in, Chat Completions out: a slot that speaks only ``chat/completions``
serves ``/v1/responses`` (Codex's ``wire_api = "responses"``, the ``openai`` SDK's
``client.responses``).

The request: ``instructions`` and the leading system/developer messages become one system
message; ``input`` (a string, or items: messages with input_text/input_image/output_text
content, function_call and function_call_output, custom tool calls) becomes the chat
messages, after the conversation a ``previous_response_id`` names (the API layer looks it up
in hal0web's store and passes it in ``ClientRequest.context``); function tools become chat
tools; ``text.format`` becomes ``response_format``, ``reasoning.effort`` ``reasoning_effort``,
``max_output_tokens`` ``max_tokens``. What chat cannot carry (hosted tools such as
web_search, a file by id) is left out and said in the answer's ``X-Hal0-Dropped`` header;
what cannot be served at all (a background response, a stored prompt) is a 400.

The answer and the stream come back as a Response (``responses_back``), with an id hal0web
issues (``resp_hal0…``) and keeps, since the slot keeps nothing. Pure: no Django, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dispatch.wire.adapters import ClientRequest, Outgoing, passthrough
from dispatch.wire.errors import ApiError, dumps, invalid_request
from dispatch.wire.translators.responses_back import Asked, FromChat, new_id

# The ids hal0web issues for the responses it translates: it alone holds them.
RESPONSE_ID_PREFIX = "resp_hal0"

# What a client may ask of a stored conversation: ``context["conversation"]`` is the list of
# items a previous_response_id stands for (its inputs and outputs, in order).
CONVERSATION = "conversation"

_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
_DETAILS = frozenset({"low", "high", "auto", "original"})
# Request fields no chat server can honour: refused rather than silently ignored.
_REFUSED = {
    "background": "background responses",
    "conversation": "conversations (the Conversations API)",
    "prompt": "stored prompts",
}


def is_ours(response_id: str) -> bool:
    """Whether ``response_id`` is one hal0web issued (and keeps) for a translated response."""
    return response_id.startswith(RESPONSE_ID_PREFIX)


# --- input items -------------------------------------------------------------------------------


def _item_kind(item: Mapping[str, Any]) -> Any:
    """An item's type; an "easy" message (``{"role": ..., "content": ...}``) is a message."""
    kind = item.get("type")
    return "message" if kind is None and "role" in item else kind


_ID_KINDS = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
}


def input_items(given: Any, param: str = "input") -> list[dict[str, Any]]:
    """A request's ``input`` as the list of items it stands for (a string is one user
    message), each with a type and an id (as ``input_items`` lists them)."""
    if given is None:
        return []
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": given}]
    if not isinstance(given, list):
        raise invalid_request(f"'{param}' must be a string or a list of input items.", param)
    items: list[dict[str, Any]] = []
    for i, item in enumerate(given):
        if not isinstance(item, dict):
            raise invalid_request(
                f"'{param}[{i}]' must be an object (an input item).", f"{param}[{i}]"
            )
        kind = _item_kind(item)
        if not isinstance(kind, str):
            raise invalid_request(f"'{param}[{i}].type' must be a string.", f"{param}[{i}].type")
        made = {**item, "type": kind}
        content = made.get("content")
        if kind == "message" and isinstance(content, str):
            part = "output_text" if made.get("role") == "assistant" else "input_text"
            made["content"] = [{"type": part, "text": content}]
        if kind in _ID_KINDS and not isinstance(made.get("id"), str):
            made["id"] = new_id(_ID_KINDS[kind])
        items.append(made)
    return items


class _Messages:
    """Chat messages made from Responses items, one item at a time, and what was left out."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.dropped: list[str] = []

    def drop(self, what: str) -> None:
        if what not in self.dropped:
            self.dropped.append(what)

    def add(self, item: Mapping[str, Any], param: str) -> None:
        kind = _item_kind(item)
        if kind == "message":
            self._message(item, param)
        elif kind in ("function_call", "custom_tool_call"):
            self._call(item, param, custom=kind == "custom_tool_call")
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = _string(item, "call_id", param)
            output = item.get("output")
            self.messages.append(
                {"role": "tool", "tool_call_id": call_id, "content": self._output(output)}
            )
        elif kind == "reasoning":
            # The model's own earlier reasoning: chat has no place for it in a request.
            self.drop("item:reasoning")
        else:
            self.drop(f"item:{kind}")

    def _message(self, item: Mapping[str, Any], param: str) -> None:
        role = item.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise invalid_request(
                f"'{param}.role' must be one of user, assistant, system, developer.",
                f"{param}.role",
            )
        content = item.get("content")
        if role == "user":
            self.messages.append({"role": "user", "content": self._user(content, param)})
        elif role == "assistant":
            self.messages.append({"role": "assistant", "content": self._text(content, param, "")})
        else:  # developer is a system message to a chat server (few templates know the role)
            self.messages.append({"role": "system", "content": self._text(content, param, "\n")})

    def _call(self, item: Mapping[str, Any], param: str, custom: bool) -> None:
        name = _string(item, "name", param)
        call_id = _string(item, "call_id", param)
        if custom:  # a freeform tool's input is text: carried as the one argument it is
            arguments = dumps({"input": _string(item, "input", param)}).decode()
        else:
            given = item.get("arguments", "")
            arguments = given if isinstance(given, str) else dumps(given).decode()
        call = {
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant":
            # The calls an assistant turn makes follow its text as items of their own; in chat
            # they are that one message's tool_calls.
            last.setdefault("tool_calls", []).append(call)
        else:
            self.messages.append({"role": "assistant", "content": None, "tool_calls": [call]})

    def _output(self, output: Any) -> str:
        if isinstance(output, str):
            return output
        if isinstance(output, list):
            return self._text(output, "output", "\n")
        return dumps(output).decode()

    def _text(self, content: Any, param: str, sep: str) -> str:
        """A system, assistant or tool message's content: text only."""
        if isinstance(content, str):
            return content
        texts = []
        for part in self._parts(content, param):
            if part.get("type") == "text":
                texts.append(part["text"])
            else:
                self.drop("content:image_url")
        return sep.join(texts)

    def _user(self, content: Any, param: str) -> str | list[dict[str, Any]]:
        if isinstance(content, str):
            return content
        parts = self._parts(content, param)
        if len(parts) == 1 and parts[0]["type"] == "text":
            return str(parts[0]["text"])
        return parts

    def _parts(self, content: Any, param: str) -> list[dict[str, Any]]:
        if not isinstance(content, list):
            raise invalid_request(f"'{param}.content' must be a string or a list of parts.", param)
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            at = f"{param}.content[{j}]"
            if not isinstance(part, dict):
                raise invalid_request(f"'{at}' must be an object (a content part).", at)
            kind = part.get("type")
            kind = kind if isinstance(kind, str) else "untyped"
            if kind in _TEXT_PARTS:
                parts.append({"type": "text", "text": _string(part, "text", at)})
            elif kind == "refusal":
                parts.append({"type": "text", "text": _string(part, "refusal", at)})
            elif kind == "input_image" and isinstance(part.get("image_url"), str):
                image: dict[str, Any] = {"url": part["image_url"]}
                detail = part.get("detail")
                if isinstance(detail, str) and detail in _DETAILS and detail != "original":
                    image["detail"] = detail
                parts.append({"type": "image_url", "image_url": image})
            elif kind == "input_image":
                self.drop("content:input_image(file_id)")  # an uploaded file hal0web has not
            else:
                self.drop(f"content:{kind}")
        return parts


def _string(item: Mapping[str, Any], key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise invalid_request(f"'{param}.{key}' must be a string.", f"{param}.{key}")
    return value


def _leading_system_merged(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The system messages a conversation opens with (instructions, Codex's developer
    messages) as one: many chat templates take a single system message, first."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    if lead < 2:
        return messages
    text = "\n\n".join(str(m["content"]) for m in messages[:lead] if m["content"])
    return [{"role": "system", "content": text}, *messages[lead:]]


# --- tools, formats, options -------------------------------------------------------------------


def _tools(body: Mapping[str, Any], dropped: list[str]) -> list[dict[str, Any]]:
    given = body.get("tools")
    if given is None:
        return []
    if not isinstance(given, list):
        raise invalid_request("'tools' must be a list.", "tools")
    tools = []
    for i, tool in enumerate(given):
        if not isinstance(tool, dict):
            raise invalid_request(f"'tools[{i}]' must be an object.", f"tools[{i}]")
        kind = tool.get("type")
        if kind != "function":
            # Hosted tools (web_search, file_search, code_interpreter, ...) run on OpenAI's
            # side, and a namespace's tools are called by their namespace: no chat server
            # has them.
            what = str(kind) if isinstance(kind, str) else "untyped"
            if what not in dropped:
                dropped.append(what)
            continue
        function: dict[str, Any] = {"name": _string(tool, "name", f"tools[{i}]")}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise invalid_request(
                f"'tools[{i}].parameters' must be a JSON schema.", f"tools[{i}].parameters"
            )
        function["parameters"] = parameters or {"type": "object", "properties": {}}
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        tools.append({"type": "function", "function": function})
    return tools


def _tool_choice(
    given: Any, tools: list[dict[str, Any]], dropped: list[str]
) -> tuple[Any, list[dict[str, Any]]]:
    """Chat's tool_choice (None: leave it out) and the tools it leaves on offer."""
    if given is None or not tools:
        return None, tools
    if given in ("auto", "none", "required"):
        return given, tools
    if isinstance(given, dict) and given.get("type") == "function":
        name = _string(given, "name", "tool_choice")
        return {"type": "function", "function": {"name": name}}, tools
    if isinstance(given, dict) and given.get("type") == "allowed_tools":
        allowed = given.get("tools")
        names = {
            t["name"]
            for t in (allowed if isinstance(allowed, list) else [])
            if isinstance(t, dict) and isinstance(t.get("name"), str)
        }
        mode = given.get("mode") if given.get("mode") in ("auto", "required") else "auto"
        return mode, [t for t in tools if t["function"]["name"] in names]
    if isinstance(given, dict):
        dropped.append(f"tool_choice:{given.get('type')}")
        return None, tools
    raise invalid_request("'tool_choice' must be auto, none, required or an object.", "tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise invalid_request("'text' must be an object.", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise invalid_request("'text.format' must be an object.", "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise invalid_request(
                "'text.format.schema' must be a JSON schema.", "text.format.schema"
            )
        spec: dict[str, Any] = {
            "name": fmt["name"] if isinstance(fmt.get("name"), str) else "response",
            "schema": schema,
        }
        for key, kind_ok in (("strict", bool), ("description", str)):
            if isinstance(fmt.get(key), kind_ok):
                spec[key] = fmt[key]
        return {"type": "json_schema", "json_schema": spec}
    raise invalid_request(
        "'text.format.type' must be text, json_object or json_schema.", "text.format.type"
    )


def _number(body: Mapping[str, Any], key: str, whole: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return None
    numeric = isinstance(value, int) if whole else isinstance(value, int | float)
    if isinstance(value, bool) or not numeric:
        raise invalid_request(f"'{key}' must be {'an integer' if whole else 'a number'}.", key)
    return value


def _options(body: Mapping[str, Any], chat: dict[str, Any]) -> None:
    """The sampling and length options chat has under its own names."""
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = _number(body, key)
        if value is not None:
            chat[key] = value
    limit = _number(body, "max_output_tokens", whole=True)
    if limit is not None:
        chat["max_tokens"] = limit
    logprobs = _number(body, "top_logprobs", whole=True)
    if logprobs:
        chat["logprobs"], chat["top_logprobs"] = True, logprobs
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise invalid_request("'reasoning' must be an object.", "reasoning")
    if reasoning and isinstance(reasoning.get("effort"), str):
        chat["reasoning_effort"] = reasoning["effort"]
    if isinstance(body.get("user"), str):
        chat["user"] = body["user"]
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt


def _refusals(body: Mapping[str, Any]) -> None:
    for key, what in _REFUSED.items():
        if body.get(key):
            raise invalid_request(
                f"A slot that speaks only chat/completions cannot serve {what}; "
                "hal0web translates Responses requests for it.",
                key,
                "unsupported_parameter",
            )


# --- the adapter -------------------------------------------------------------------------------


def _conversation(request: ClientRequest, body: Mapping[str, Any]) -> list[dict[str, Any]]:
    previous = body.get("previous_response_id")
    if previous is None:
        return []
    given = request.context.get(CONVERSATION)
    if not isinstance(given, list):
        # The API layer hands the stored conversation of every id hal0web keeps; any other
        # id lives on the slot that made it, which is never this chat-only one.
        raise ApiError(
            404,
            "response_not_found",
            f"No response with id '{previous}' is kept by hal0web for this slot.",
            param="previous_response_id",
        )
    return given


def to_chat(request: ClientRequest, upstream_model: str | None) -> tuple[dict[str, Any], Asked]:
    """The chat/completions body for a Responses request, and what the way back needs."""
    body = request.body.json()
    if body is None:
        raise invalid_request("The request body must be a JSON object.", None)
    _refusals(body)
    history = _conversation(request, body)
    items = input_items(body.get("input"))
    made = _Messages()
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        made.messages.append({"role": "system", "content": instructions})
    elif isinstance(instructions, list):
        for i, item in enumerate(input_items(instructions, "instructions")):
            made.add(item, f"instructions[{i}]")
    elif instructions is not None and not isinstance(instructions, str):
        raise invalid_request("'instructions' must be a string.", "instructions")
    for item in history:
        made.add(item, "previous_response_id")
    for i, item in enumerate(items):
        made.add(item, f"input[{i}]")
    if not made.messages:
        raise invalid_request("'input' is required: there is nothing to answer.", "input")
    chat: dict[str, Any] = {"messages": _leading_system_merged(made.messages)}
    model = upstream_model or body.get("model")
    if model is not None:
        chat = {"model": model, **chat}
    dropped = made.dropped
    tools, tool_choice = _tools(body, dropped), None
    tool_choice, tools = _tool_choice(body.get("tool_choice"), tools, dropped)
    if tools:
        chat["tools"] = tools
        if tool_choice is not None:
            chat["tool_choice"] = tool_choice
        if isinstance(body.get("parallel_tool_calls"), bool):
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    _options(body, chat)
    stream = body.get("stream") is True
    if stream:
        # The Response's usage comes from the stream's last chunk; without this a chat
        # server sends none.
        chat["stream"], chat["stream_options"] = True, {"include_usage": True}
    asked = Asked.of(body, items, history, tuple(dropped), stream, tools)
    return chat, asked


def adapt(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    chat, asked = to_chat(request, upstream_model)
    return Outgoing("chat/completions", dumps(chat), FromChat(asked, new_id("resp")))


ADAPTERS = (
    ("responses", "chat/completions", adapt),
    # Compaction (Codex's remote compaction) is the Responses server's own work: sent as it
    # came to a slot that speaks Responses natively; a chat-only slot does not serve it
    # (404 endpoint_not_supported, naming the slot), never a 405.
    ("responses/compact", "responses", passthrough),
)
