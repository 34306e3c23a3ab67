"""Reading a request body just far enough to route it, and rewriting only ``model``.

The body is forwarded byte-for-byte. When the decision sends a different model name upstream
(an alias, a ``slot/model`` id, a default), only the value of the top-level ``model`` key
changes; the rest of the bytes are left exactly as the client wrote them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from dispatch.errors import ApiError

# A key "model" outside any string: inside a JSON string every quote is escaped, so an
# unescaped `"model"` preceded by `{` or `,` can only be a key.
_MODEL_KEY = re.compile(rb'(?<=[{,])(\s*"model"\s*:\s*)("(?:[^"\\]|\\.)*"|null)')


@dataclass(frozen=True, slots=True)
class ParsedBody:
    raw: bytes
    data: dict[str, Any]
    model: str | None
    stream: bool


def parse(raw: bytes) -> ParsedBody:
    if not raw.strip():
        raise ApiError(400, "invalid_json", "The request body is empty; send a JSON object.")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(
            400,
            "invalid_request_error",
            f"The request body must be a JSON object, not {type(data).__name__}.",
        )
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(
            400,
            "invalid_model",
            f"`model` must be a string, not {type(model).__name__}.",
            param="model",
        )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(
            400, "invalid_request_error", "`stream` must be true or false.", param="stream"
        )
    return ParsedBody(raw, data, model, stream)


def with_model(body: ParsedBody, upstream_model: str) -> bytes:
    """The body with its top-level ``model`` set to ``upstream_model``, all else unchanged."""
    if body.model == upstream_model:
        return body.raw
    value = orjson.dumps(upstream_model)
    if body.model is None and "model" not in body.data:
        stripped = body.raw.lstrip()
        inner = stripped[1:].lstrip()
        sep = b"" if inner.startswith(b"}") else b","
        return b'{"model":' + value + sep + stripped[1:]
    matches = list(_MODEL_KEY.finditer(body.raw))
    if len(matches) == 1:
        m = matches[0]
        return body.raw[: m.start(2)] + value + body.raw[m.end(2) :]
    # "model" is also a key in some nested object: we cannot tell which one is top-level
    # without a full scan, so re-encode. Same JSON meaning, possibly different spacing.
    return orjson.dumps({**body.data, "model": upstream_model})
