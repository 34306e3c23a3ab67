"""One object per wire protocol a client or an upstream speaks: OpenAI, Anthropic, Ollama.

Each owns its error body, its stream framing and error event, and where its answers and
streams carry token counts. The endpoint table names the protocol of each path
(``dispatch.routing.endpoints``); an upstream's stream is read by the protocol whose framing
its content type is (``streamed_as``). Pure: no Django, no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import orjson

from dispatch.lib import redact
from dispatch.wire.errors import dumps
from dispatch.wire.framing import NDJSON, SSE, Framing


class Usage(NamedTuple):
    """Token counts an upstream reported (None: not reported, or not a count)."""

    prompt: int | None
    completion: int | None


class WireProtocol(ABC):
    """What hal0web must know of one protocol to answer in it and to read what it sends."""

    name: str
    framing: Framing
    # A header besides ``Authorization`` its SDK sends the API key in.
    key_header: str | None = None
    # The name of its stream's error event (SSE names events; NDJSON cannot).
    error_event_name: str | None = None
    # The object holding the token counts (None: they sit on the answer itself), and their
    # names, the first one present wins.
    usage_key: str | None = "usage"
    prompt_fields: tuple[str, ...] = ()
    completion_fields: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<{self.name} protocol>"

    @abstractmethod
    def error_data(self, status: int, code: str, message: str, param: str | None) -> Any:
        """hal0web's error as this protocol's clients parse one."""

    def error_body(self, status: int, code: str, message: str, param: str | None = None) -> bytes:
        return dumps(self.error_data(status, code, message, param))

    def error_event(self, code: str, message: str, tail: bytes = b"", status: int = 502) -> bytes:
        """The last event of a stream that failed after its first byte (``tail``: the end of
        what was already sent; ``status``: the one its error body would have had as an answer)."""
        body = self.error_body(status, code, message)
        return self.framing.event(body, tail, self.error_event_name)

    def between_events(self, tail: bytes) -> bool:
        return self.framing.between_events(tail)

    def is_own_error(self, data: object) -> bool:
        """Whether an upstream's parsed error answer is already this protocol's error (then
        it passes as it is); OpenAI's shape is tested apart (``errors.is_openai_error``)."""
        return False

    def __init__(self) -> None:
        # Bytes that a chunk or answer carrying token counts contains: looked for in every
        # answer and stream chunk, so made once.
        field = self.usage_key or self.completion_fields[0]
        self.usage_marker: bytes = b'"' + field.encode() + b'"'

    def usage_of(self, data: object) -> Usage | None:
        """The counts in a parsed answer or stream event."""
        if not isinstance(data, dict):
            return None
        usage = data.get(self.usage_key) if self.usage_key else data
        if usage is None and self.usage_key and isinstance(data.get("response"), dict):
            # A Responses stream's last event carries its whole Response, counts and all.
            usage = data["response"].get(self.usage_key)
        if not isinstance(usage, dict):
            return None
        return Usage(_count_of(usage, self.prompt_fields), _count_of(usage, self.completion_fields))

    def usage_in_answer(self, content: bytes) -> Usage | None:
        """The counts of a whole JSON answer; only the usage object is parsed, not the answer
        (an embeddings answer can be megabytes of vectors)."""
        if self.usage_key is None:
            return self.usage_of(_loads(content))
        return self.usage_of({self.usage_key: _loads(_last_object(content, self.usage_marker))})

    def usage_in_stream(self, chunk: bytes) -> Usage | None:
        """The counts of the last event in ``chunk`` that carries them."""
        for payload in self.framing.payloads(chunk):
            if self.usage_marker in payload:
                return self.usage_of(_loads(payload))
        return None


def _count_of(usage: dict[str, Any], names: tuple[str, ...]) -> int | None:
    """The first of ``names`` present, if it is a count (None: absent, or not a count)."""
    for name in names:
        if name in usage:
            value = usage[name]
            return value if type(value) is int and value >= 0 else None
    return None


def _loads(content: bytes | None) -> object:
    if content is None:
        return None
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _last_object(content: bytes, key: bytes) -> bytes | None:
    """The object that is the value of the last bare ``key``: a model's text cannot fake the
    key, inside a JSON string its quotes are escaped (``\\"usage\\"``)."""
    at = content.rfind(key)
    start = content.find(b"{", at) if at >= 0 else -1
    if start < 0:
        return None
    end = start
    while True:  # the closing brace of the object (usage may nest *_tokens_details)
        end = content.find(b"}", end + 1)
        if end < 0:
            return None
        part = content[start : end + 1]
        if part.count(b"{") == part.count(b"}"):
            return part


# The error types the SDKs expect by status.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Anthropic's (its API reference, "Errors"); a 5xx of a gateway is its api_error, a 503 its
# overloaded_error (what the SDK retries and reports as such).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class OpenAI(WireProtocol):
    """The ``openai`` SDK's: {"error": {message, type, param, code}}, SSE ``data:`` events."""

    name = "openai"
    framing = SSE
    # Chat's names, or the Responses API's (input/output_tokens).
    prompt_fields = ("prompt_tokens", "input_tokens")
    completion_fields = ("completion_tokens", "output_tokens")

    def error_data(self, status: int, code: str, message: str, param: str | None) -> Any:
        kind = _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        # Whatever an error quotes (a slot's URL, an upstream's words), no credential in a URL
        # reaches the client.
        message = redact.masked(message)
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Anthropic(WireProtocol):
    """The ``anthropic`` SDK's: {"type": "error", "error": {type, message}}, named SSE events."""

    name = "anthropic"
    framing = SSE
    key_header = "x-api-key"
    error_event_name = "error"
    prompt_fields = ("input_tokens", "prompt_tokens")
    completion_fields = ("output_tokens", "completion_tokens")

    def error_data(self, status: int, code: str, message: str, param: str | None) -> Any:
        default = "api_error" if status >= 500 else "invalid_request_error"
        kind = _ANTHROPIC_TYPES.get(status, default)
        # hal0web's own code rides along in the error object (the SDK keeps the body).
        return {"type": "error", "error": {"type": kind, "message": message, "code": code}}


class Ollama(WireProtocol):
    """Ollama's native API: {"error": "..."}, NDJSON streams, counts on the answer itself."""

    name = "ollama"
    framing = NDJSON
    usage_key = None
    prompt_fields = ("prompt_eval_count",)
    completion_fields = ("eval_count",)

    def error_data(self, status: int, code: str, message: str, param: str | None) -> Any:
        return {"error": redact.masked(message), "code": code}

    def is_own_error(self, data: object) -> bool:
        return isinstance(data, dict) and isinstance(data.get("error"), str)


OPENAI = OpenAI()
ANTHROPIC = Anthropic()
OLLAMA = Ollama()
PROTOCOLS: tuple[WireProtocol, ...] = (OPENAI, ANTHROPIC, OLLAMA)


def streamed_as(protocol: WireProtocol, content_type: str) -> WireProtocol | None:
    """The protocol an upstream's answer of ``content_type`` streams in: the path's own when
    its framing matches, else the first whose framing does (an NDJSON stream on an OpenAI
    path); None when the answer is no stream."""
    # On every answer: plain startswith tests, no generator (the hot path's one caller).
    if content_type.startswith(protocol.framing.content_type):
        return protocol
    for p in PROTOCOLS:
        if content_type.startswith(p.framing.content_type):
            return p
    return None
