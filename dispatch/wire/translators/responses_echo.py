"""What a translated Response repeats of its request, each field in the type the Responses
API gives it (OpenAI's reference, and the Open Responses schema llm-comply checks): the
request's value when it has that type, else the API's default. A request's odd value (a
string for ``top_p``) never reaches the Response: the answer stays one every SDK parses.
Pure: no Django, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dispatch.wire.translators.values import is_number

_CHOICES = ("auto", "none", "required")


def _number(default: float) -> Callable[[Any], Any]:
    def read(value: Any) -> Any:
        return value if is_number(value) else default

    return read


def _whole(value: Any) -> int | None:
    return value if type(value) is int else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _instructions(value: Any) -> Any:
    return value if isinstance(value, str | list) else None


def _reasoning(value: Any) -> dict[str, Any]:
    given = value if isinstance(value, dict) else {}
    return {"effort": _text(given.get("effort")), "summary": _text(given.get("summary"))}


def _format(value: Any) -> dict[str, Any]:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema" and isinstance(value, dict):
        return {
            "type": "json_schema",
            "name": _text(value.get("name")) or "response",
            "description": _text(value.get("description")),
            "schema": value.get("schema"),
            "strict": value.get("strict") is True,
        }
    return {"type": "text"}


def _text_field(value: Any) -> dict[str, Any]:
    given = value if isinstance(value, dict) else {}
    field = {"format": _format(given.get("format"))}
    if isinstance(given.get("verbosity"), str):
        field["verbosity"] = given["verbosity"]
    return field


def _tool_choice(value: Any) -> Any:
    if isinstance(value, str) and value in _CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "name": _text(value.get("name")) or ""}
    if isinstance(value, dict) and value.get("type") == "allowed_tools":
        tools = value.get("tools")
        mode = value.get("mode")
        return {
            "type": "allowed_tools",
            "mode": mode if isinstance(mode, str) and mode in _CHOICES else "auto",
            "tools": [
                {"type": "function", "name": t["name"]}
                for t in (tools if isinstance(tools, list) else [])
                if isinstance(t, dict) and isinstance(t.get("name"), str)
            ],
        }
    return "auto"


# Each echoed field: how the request's value is read (its default when it has none or an odd one).
_FIELDS: Mapping[str, Callable[[Any], Any]] = {
    "instructions": _instructions,
    "max_output_tokens": _whole,
    "max_tool_calls": _whole,
    "metadata": lambda v: v if isinstance(v, dict) else {},
    "parallel_tool_calls": lambda v: v is not False,
    "previous_response_id": _text,
    "prompt_cache_key": _text,
    "reasoning": _reasoning,
    "safety_identifier": _text,
    "service_tier": lambda v: v if isinstance(v, str) else "default",
    "store": lambda v: v is not False,
    "temperature": _number(1.0),
    "top_p": _number(1.0),
    "presence_penalty": _number(0.0),
    "frequency_penalty": _number(0.0),
    "top_logprobs": lambda v: v if type(v) is int else 0,
    "text": _text_field,
    "tool_choice": _tool_choice,
    "truncation": lambda v: v if v in ("auto", "disabled") else "disabled",
    "user": _text,
}


def echoed(body: Mapping[str, Any], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The request's fields a Response repeats; ``tools`` are the chat tools it was
    answered with (hosted ones were left out), said again in the Responses API's shape."""
    echo = {name: read(body.get(name)) for name, read in _FIELDS.items()}
    echo["tools"] = [
        {
            "type": "function",
            "name": t["function"]["name"],
            "description": t["function"].get("description"),
            "parameters": t["function"].get("parameters"),
            "strict": t["function"].get("strict"),
        }
        for t in tools
    ]
    return echo
