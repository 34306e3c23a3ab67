"""The endpoint table: every API path hal0web serves, and how each one is routed.

The single source of these facts. The URL patterns (``hal0web/urls.py``), the paths the lean
handler takes (``runtime``), the 404's list of endpoints, each path's ``Allow`` header, its
wire protocol (error shape, stream framing), which header may carry hal0web's key, the slot
types that offer an endpoint by default and the names a manifest's ``endpoints = [...]`` may
use are all derived from ``ENDPOINTS`` below. Adding an endpoint is one entry here (plus its tests).

Pure: no Django, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from dispatch.wire.adapters import upstream_path as upstream_path  # the path a slot is sent
from dispatch.wire.protocols import ANTHROPIC, OLLAMA, OPENAI, WireProtocol

# Where the request names its model:
#   json      the top-level "model" of a JSON body
#   form      the "model" field of a multipart/form-data body (audio, image edits)
#   response  nowhere: the response id in the path says which slot made it (Responses API)
#   none      not routed to a slot at all (hal0web answers itself: /v1/models)
ModelIn = Literal["json", "form", "response", "none"]
# What a 2xx answer is: JSON (checked before it goes out), or bytes passed through as they
# come (audio, a transcription in text/srt/vtt). An event stream is told by its content type.
Answer = Literal["json", "bytes"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One URL pattern (or several spellings of it) and how its requests are routed."""

    # What a manifest's `endpoints` list, the metrics and the request log call it. Entries
    # that are part of another endpoint (count_tokens of messages, a response by id) name
    # that one in `offered_as`: a slot offers both or neither.
    name: str
    # Django path() patterns from the root, first the canonical one. What is sent upstream is
    # the path as the client spelt it, less the leading "v1/" (slot URLs are the API root);
    # Ollama's "api/..." from the server's root, beside /v1 (``upstream_path``).
    paths: tuple[str, ...]
    # Slot types that offer the endpoint when their manifest lists no `endpoints` (with
    # `default`), and whose default slot takes a request for it that names no model.
    types: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("POST",)
    model_in: ModelIn = "json"
    answer: Answer = "json"
    # The protocol its clients speak: the shape of hal0web's errors on it, its streams'
    # framing and error event, where its answers carry token counts.
    protocol: WireProtocol = OPENAI
    # Its answers carry an id that later requests refer to (a Responses API response):
    # hal0web records which slot made it.
    records_response: bool = False
    offered_as: str | None = None
    # Whether every slot of its `types` offers it when its manifest lists none. False: only
    # a server that speaks it natively does (its kind says so: ``Kind.speaks``), or one whose
    # manifest lists it; the others serve it by translation, if at all. Ollama's own API.
    default: bool = True
    # The endpoint a slot must offer to serve this one (``offered_as``, else itself): read
    # twice on every request, so set once.
    offer: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "offer", self.offered_as or self.name)

    @property
    def allow(self) -> str:
        """The ``Allow`` header of its paths (RFC 9110): its methods and OPTIONS."""
        return ", ".join(sorted({*self.methods, "OPTIONS"}))

    @property
    def key_header(self) -> str | None:
        """A header besides ``Authorization`` that may carry hal0web's API key: the
        ``anthropic`` SDK sends its key as ``x-api-key``, to its own paths and to the model
        list both SDKs read."""
        return ANTHROPIC.key_header if self.model_in == "none" else self.protocol.key_header

    @property
    def label(self) -> str:
        """The canonical path as a client reads it (``/v1/responses/{response_id}``)."""
        return "/" + _PARAM.sub(r"{\1}", self.paths[0])


_PARAM = re.compile(r"<(?:\w+:)?(\w+)>")

_LLM = ("llm",)
ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("chat/completions", ("v1/chat/completions",), _LLM),
    Endpoint("completions", ("v1/completions",), _LLM),
    Endpoint("responses", ("v1/responses",), _LLM, records_response=True),
    # Codex's remote compaction, routed by `model` like a new response (before the response
    # id pattern, which would take "compact" for an id). No slot offers it by name: a slot
    # that speaks Responses natively serves it as it came (wire.translators.responses_chat).
    Endpoint("responses/compact", ("v1/responses/compact",)),
    # A response lives on the server that made it: these follow its id there.
    Endpoint(
        "responses/{id}",
        ("v1/responses/<str:response_id>",),
        _LLM,
        methods=("GET", "DELETE"),
        model_in="response",
        offered_as="responses",
    ),
    Endpoint(
        "responses/{id}/input_items",
        ("v1/responses/<str:response_id>/input_items",),
        _LLM,
        methods=("GET",),
        model_in="response",
        offered_as="responses",
    ),
    Endpoint(
        "responses/{id}/cancel",
        ("v1/responses/<str:response_id>/cancel",),
        _LLM,
        model_in="response",
        offered_as="responses",
    ),
    Endpoint("messages", ("v1/messages",), _LLM, protocol=ANTHROPIC),
    Endpoint(
        "messages/count_tokens",
        ("v1/messages/count_tokens",),
        _LLM,
        protocol=ANTHROPIC,
        offered_as="messages",
    ),
    Endpoint("embeddings", ("v1/embeddings",), ("embedding",)),
    # llama.cpp serves all three spellings; Jina and Cohere clients use /v1/rerank, some
    # (Open WebUI's external reranker) the root /rerank.
    Endpoint("rerank", ("v1/rerank", "v1/reranking", "rerank"), ("reranking",)),
    Endpoint(
        "audio/transcriptions",
        ("v1/audio/transcriptions",),
        ("transcription",),
        model_in="form",
        answer="bytes",
    ),
    Endpoint(
        "audio/translations",
        ("v1/audio/translations",),
        ("transcription",),
        model_in="form",
        answer="bytes",
    ),
    Endpoint("audio/speech", ("v1/audio/speech",), ("tts",), answer="bytes"),
    Endpoint("images/generations", ("v1/images/generations",), ("image",)),
    Endpoint("images/edits", ("v1/images/edits",), ("image",), model_in="form"),
    Endpoint("images/variations", ("v1/images/variations",), ("image",), model_in="form"),
    # Ollama's own API, at the root as Ollama serves it, for clients that speak nothing else.
    # An Ollama server speaks it (kinds/ollama.py) and is sent it as it came; any other slot
    # of the type serves it by translation to its OpenAI endpoints
    # (wire/translators/ollama_openai.py).
    Endpoint("api/chat", ("api/chat",), _LLM, protocol=OLLAMA, default=False),
    Endpoint("api/generate", ("api/generate",), _LLM, protocol=OLLAMA, default=False),
    Endpoint("api/embed", ("api/embed",), ("embedding",), protocol=OLLAMA, default=False),
    Endpoint("api/embeddings", ("api/embeddings",), ("embedding",), protocol=OLLAMA, default=False),
    # Answered by hal0web itself from the routing table.
    Endpoint("models", ("v1/models",), methods=("GET", "HEAD"), model_in="none"),
    Endpoint(
        "models/{id}", ("v1/models/<path:model_id>",), methods=("GET", "HEAD"), model_in="none"
    ),
    # Ollama's model list, what is loaded, its version, one model's details (the body names
    # it): from the routing table, as /v1/models (api/ollama_models.py).
    Endpoint("api/tags", ("api/tags",), methods=("GET", "HEAD"), model_in="none", protocol=OLLAMA),
    Endpoint("api/ps", ("api/ps",), methods=("GET", "HEAD"), model_in="none", protocol=OLLAMA),
    Endpoint(
        "api/version", ("api/version",), methods=("GET", "HEAD"), model_in="none", protocol=OLLAMA
    ),
    Endpoint("api/show", ("api/show",), model_in="none", protocol=OLLAMA),
)

BY_NAME: Mapping[str, Endpoint] = MappingProxyType({e.name: e for e in ENDPOINTS})

# The endpoints a slot can offer, as a manifest's `endpoints` names them.
OFFERABLE: tuple[str, ...] = tuple(e.name for e in ENDPOINTS if e.types and e.offered_as is None)

# Every slot type, in the order the admin lists them (hal0's slot types).
SLOT_TYPES: tuple[str, ...] = tuple(dict.fromkeys(t for e in ENDPOINTS for t in e.types))

# type -> the endpoints its slots offer when the manifest lists none.
DEFAULT_ENDPOINTS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        t: frozenset(
            e.name for e in ENDPOINTS if t in e.types and e.offered_as is None and e.default
        )
        for t in SLOT_TYPES
    }
)

# endpoint (as offered) -> the slot types that offer it by default, for a request that
# names no model: the default slot of one of those types takes it.
TYPES_OF: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {e.name: e.types for e in ENDPOINTS if e.offered_as is None}
)

# Paths outside /v1 that are API paths all the same (the lean handler, key auth, no CSRF).
ROOT_PATHS: frozenset[str] = frozenset(
    "/" + p for e in ENDPOINTS for p in e.paths if not p.startswith("v1/")
)
# Prefixes under which every path is the API's: the lean handler takes them, and a path the
# table does not hold is a JSON 404 in the protocol of its clients, never a page.
API_PREFIXES: Mapping[str, WireProtocol] = MappingProxyType({"/v1/": OPENAI, "/api/": OLLAMA})

# The sentence of the 404 for a path hal0web does not serve.
SERVED_TEXT = "hal0web serves " + ", ".join(
    "/" + _PARAM.sub(r"{\1}", p) for e in ENDPOINTS for p in e.paths
)


def defaults_for(slot_type: str) -> frozenset[str]:
    """The endpoints a slot of ``slot_type`` offers when its manifest lists none."""
    return DEFAULT_ENDPOINTS.get(slot_type, frozenset())


def spoken_in(protocol: WireProtocol, slot_type: str) -> frozenset[str]:
    """The endpoints of ``protocol`` a slot of ``slot_type`` offers when its server speaks
    that protocol natively (an Ollama server: Ollama's own API)."""
    return frozenset(
        e.name
        for e in ENDPOINTS
        if e.protocol is protocol and slot_type in e.types and e.offered_as is None
    )
