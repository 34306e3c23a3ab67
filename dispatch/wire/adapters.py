"""Request adapters: what each target is sent for a request, by the endpoint the client
called and the endpoint the target's slot offers.

A slot serves an endpoint when it offers it (sent as it came: ``passthrough``) or when an
adapter registered here turns the request into one it offers (say, Anthropic Messages in,
chat/completions out: one module with its adapter, plus one ``register`` call). The
resolver asks ``serves``; forward asks ``outgoing`` for each target it tries. Endpoints are
named as slots offer them (``Endpoint.offer``: count_tokens is part of messages); an adapter
sees the client's path to tell them apart.

Pure: no Django, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote


class Body(Protocol):
    """A request body as routing read it: its bytes with ``model`` set for one target."""

    def for_model(self, upstream_model: str | None) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """What the client sent: the path as decoded, the query as sent, and the body."""

    path: str
    query: str
    body: Body


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one target is sent: the path below its slot's URL (the API root), and the body."""

    path: str
    body: bytes


# (the client's request, the model name the target takes) -> what the target is sent
Adapter = Callable[[ClientRequest, str | None], Outgoing]


def upstream_path(path: str, query: str = "") -> str:
    """The path sent to a slot (its URL is the API root) for a request to ``path`` (as
    decoded) with ``query`` (as sent): the client's spelling, less the leading ``/v1/``."""
    sent = quote(path.lstrip("/").removeprefix("v1/"))
    return f"{sent}?{query}" if query else sent


def passthrough(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    """The request as it came: the client's path, the body with only ``model`` set."""
    return Outgoing(
        upstream_path(request.path, request.query), request.body.for_model(upstream_model)
    )


# (endpoint called, endpoint offered) -> its adapter; same-endpoint pairs are passthrough.
_adapters: dict[tuple[str, str], Adapter] = {}


def register(called: str, offered: str, adapter: Adapter) -> None:
    """Let a slot offering ``offered`` serve ``called`` through ``adapter``."""
    if called == offered:
        raise ValueError(f"{called} is served as it is: it takes no adapter")
    _adapters[(called, offered)] = adapter


def unregister(called: str, offered: str) -> None:
    _adapters.pop((called, offered), None)


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
    adapter = passthrough if called in offers else adapter_for(called, offers)
    if adapter is None:  # the resolver only picks slots that serve the endpoint
        raise LookupError(f"no slot offering {sorted(offers)} serves {called}")
    return adapter(request, upstream_model)
