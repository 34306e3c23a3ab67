"""Request adapters: what each target is sent for a request, by the endpoint the client
called and the endpoint the target's slot offers.

A slot serves an endpoint when it offers it (sent as it came: ``passthrough``) or when an
adapter registered here turns the request into one it offers (say, Anthropic Messages in,
chat/completions out: a module in ``dispatch.wire.translators`` listing its adapters, which
that package's ``install()`` registers at start-up). The
resolver asks ``serves``; forward asks ``outgoing`` for each target it tries. Endpoints are
named as slots offer them (``Endpoint.offer``: count_tokens is part of messages); an adapter
sees the client's path to tell them apart.

A translating adapter's ``Outgoing`` carries a ``Translation``: one object per call that
turns the upstream's answer back into the client's protocol (a JSON answer whole, a stream
event by event as its chunks arrive). Passthrough carries none, so its answers are relayed
untouched: that is ``mode`` (``passthrough`` or ``translated``), which every answer, log
line, request-log row and live event says. (An adapter registered for two endpoints may
still be ``passthrough`` itself: ``responses/compact`` is sent as it came to a slot that
offers ``responses``.)

Pure: no Django, no I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol
from urllib.parse import quote

# How a target serves a call: sent as it came, or translated to an endpoint it offers.
Mode = Literal["passthrough", "translated"]
PASSTHROUGH: Final[Mode] = "passthrough"
TRANSLATED: Final[Mode] = "translated"


class Body(Protocol):
    """A request body as routing read it: its bytes with ``model`` set for one target."""

    def for_model(self, upstream_model: str | None) -> bytes: ...

    def json(self) -> dict[str, Any] | None:
        """The body parsed (a JSON object), or None when it is no JSON body (a form)."""
        ...


_NOTHING: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """What the client sent: the path as decoded, the query as sent, and the body.

    ``context``: what the API layer looked up for an adapter before forwarding (adapters
    are pure and do no I/O), e.g. the conversation a ``previous_response_id`` names."""

    path: str
    query: str
    body: Body
    context: Mapping[str, Any] = field(default_factory=lambda: _NOTHING)
    # What the target's slot offers, as a translating adapter is given it (``outgoing``): to
    # choose among them (Ollama's raw generate goes to completions where it is offered).
    offers: Set[str] = frozenset()


class Translation(ABC):
    """One translated call's way back: the upstream's answer (in the protocol of the endpoint
    the slot offers) turned into what the client called. Made by the adapter for each call,
    so it may keep what the request said (the model name the client used, its tools) and
    what the stream has sent so far (open content blocks, an index per block)."""

    # The media type of what the client is sent: a JSON answer or its protocol's stream.
    answer_type: str = "application/json"
    stream_type: str = "text/event-stream"
    # How long the call waited for its model to be loaded first (seconds): set by forward
    # before the answer comes, for a protocol that tells it (Ollama's load_duration).
    load_s: float = 0.0
    # Headers the client's answer carries besides the relay's (``X-Hal0-Dropped``: what the
    # request asked that the offered endpoint cannot carry), known when the call is made.
    headers: Mapping[str, str] = _NOTHING
    # What hal0web keeps once the answer is whole (a Responses API response the slot does
    # not keep), set by ``answer`` or by the stream's last event: the relay hands it to the
    # API layer's store before those bytes reach the client. None: nothing to keep.
    kept: object | None = None

    @abstractmethod
    def answer(self, content: bytes) -> bytes:
        """A whole 2xx JSON answer, translated. Raises ValueError when it is not the answer
        the offered endpoint gives (the client then gets a 502 in its own protocol)."""

    @abstractmethod
    def stream(self, chunk: bytes) -> bytes:
        """The client's bytes for one upstream stream chunk, as it arrives: whole events
        only (a cut event waits for its rest), possibly none yet. Never the stream whole."""

    @abstractmethod
    def end(self) -> bytes:
        """The client's last events once the upstream stream ended (closing what is open)."""

    def refused(self, status: int, content: bytes) -> bytes | None:
        """An answer of the translation's own (a 2xx JSON body) when the offered endpoint
        answered ``status`` (an error) with ``content``; None, the default: the error goes
        to the client in its protocol. For a call that can do without the upstream: a
        token count estimated where the server has no tokenizer."""
        return None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one target is sent: the path below its slot's URL (the API root; from its
    server's root when it begins with ``/``), the body, and for a translated call the way its
    answer goes back (None: passed through as it comes)."""

    path: str
    body: bytes
    translation: Translation | None = field(default=None, compare=False)

    @property
    def mode(self) -> Mode:
        return PASSTHROUGH if self.translation is None else TRANSLATED


# (the client's request, the model name the target takes) -> what the target is sent. A
# request it cannot translate raises ``dispatch.wire.errors.ApiError`` (the client's 400).
Adapter = Callable[[ClientRequest, str | None], Outgoing]


# Paths a server serves beside its API root, not below it: Ollama's own API (/api/chat next
# to /v1/chat/completions). Sent from the server's root.
FROM_ROOT: tuple[str, ...] = ("/api/",)


def upstream_path(path: str, query: str = "") -> str:
    """The path sent to a slot (its URL is the API root) for a request to ``path`` (as
    decoded) with ``query`` (as sent): the client's spelling, less the leading ``/v1/``; a
    path of ``FROM_ROOT`` as it is, from the server's root."""
    if path.startswith(FROM_ROOT):
        sent = quote(path)
    else:
        sent = quote(path.lstrip("/").removeprefix("v1/"))
    return f"{sent}?{query}" if query else sent


def passthrough(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """The request as it came: the client's path, the body with only ``model`` set."""
    return Outgoing(
        upstream_path(request.path, request.query), request.body.for_model(upstream_model)
    )


# (endpoint called, endpoint offered) -> its adapter; a slot offering the endpoint called
# takes it as it came, with no entry here.
_adapters: dict[tuple[str, str], Adapter] = {}


def register(called: str, offered: str, adapter: Adapter) -> None:
    """Let a slot offering ``offered`` serve ``called`` through ``adapter``."""
    if called == offered:
        raise ValueError(f"{called} is served as it is: it takes no adapter")
    _adapters[(called, offered)] = adapter


def unregister(called: str, offered: str) -> None:
    _adapters.pop((called, offered), None)


def translated_to(called: str, offers: Set[str]) -> str | None:
    """The endpoint a slot offering ``offers`` is sent ``called`` as, when it does not offer
    it itself (None: it offers it, or cannot serve it)."""
    if called in offers:
        return None
    return next((o for (c, o) in _adapters if c == called and o in offers), None)


def translations(offers: Set[str]) -> frozenset[str]:
    """Every endpoint a slot offering ``offers`` serves by translation (not natively)."""
    return frozenset(c for (c, o) in _adapters if o in offers and c not in offers)


def adapter_for(called: str, offers: Set[str]) -> Adapter | None:
    """How a slot offering ``offers`` serves ``called``: passthrough when it offers it,
    else the first registered adapter to an endpoint it offers; None when it cannot."""
    if called in offers:
        return passthrough
    return next((a for (c, o), a in _adapters.items() if c == called and o in offers), None)


def serves(called: str, offers: Set[str]) -> bool:
    """Whether a slot offering ``offers`` can serve the endpoint ``called``."""
    return called in offers or adapter_for(called, offers) is not None


def outgoing(
    called: str, offers: Set[str], request: ClientRequest, upstream_model: str | None
) -> Outgoing:
    """What a target whose slot offers ``offers`` is sent for ``request`` to ``called``."""
    if called in offers:
        return passthrough(request, upstream_model)
    adapter = adapter_for(called, offers)
    if adapter is None:  # the resolver only picks slots that serve the endpoint
        raise LookupError(f"no slot offering {sorted(offers)} serves {called}")
    return adapter(replace(request, offers=frozenset(offers)), upstream_model)
