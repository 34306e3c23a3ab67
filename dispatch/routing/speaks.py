"""What a slot speaks: the endpoints its server answers natively, and those hal0web serves
for it by translation.

A slot's native endpoints come from, first to last: its manifest's ``endpoints`` list
(declared); what asking its server found (discovered: ``dispatch.lifecycle.discovery`` at
each readiness, or a request that met a missing route, ``dispatch.coordination.spoken``);
what its kind of server is taken to speak for its type (``Kind.speaks``). A finding is kept
with what it was found of, the slot's kind, type and URL (``Slot.spoken``: ``{"for": key,
"found": {endpoint: bool}}``): once any of them changes it no longer counts, and the server
is asked again.

Every endpoint a registered adapter turns into one the slot speaks is served by translation
(``dispatch.wire.adapters``): ``serving`` says which is which, the one word the page, the
admin, ``/v1/models`` and the explanations show ("messages · translated").

Pure: no Django, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any, Final, Literal

from dispatch.routing.endpoints import OFFERABLE
from dispatch.wire import adapters

# How a slot serves an endpoint.
Served = Literal["native", "translated"]
NATIVE: Final[Served] = "native"
TRANSLATED: Final[Served] = "translated"

# Where a slot's native endpoints come from.
Source = Literal["manifest", "server", "kind"]
DECLARED: Final[Source] = "manifest"
DISCOVERED: Final[Source] = "server"
ASSUMED: Final[Source] = "kind"


def key(kind: str, slot_type: str, url: str) -> str:
    """What a finding is of: a slot's kind, type and URL (any change asks the server again)."""
    return f"{kind} {slot_type} {url}"


def found_for(stored: Any, of: str) -> dict[str, bool]:
    """The finding kept in ``Slot.spoken`` when it is of ``of`` (``key``), else none."""
    if not isinstance(stored, Mapping) or stored.get("for") != of:
        return {}
    found = stored.get("found")
    if not isinstance(found, Mapping):
        return {}
    return {str(e): v for e, v in found.items() if isinstance(v, bool)}


def stored(of: str, found: Mapping[str, bool]) -> dict[str, Any]:
    """A finding as ``Slot.spoken`` keeps it."""
    return {"for": of, "found": dict(sorted(found.items()))}


def native(assumed: Set[str], found: Mapping[str, bool]) -> frozenset[str]:
    """The endpoints a slot listing none speaks: what its kind is taken to speak, corrected
    by what its server was found to speak (or not)."""
    return frozenset(
        {*(e for e in assumed if found.get(e, True)), *(e for e, yes in found.items() if yes)}
    )


def resolved(
    listed: Sequence[str], assumed: Set[str], kept: Any, of: str
) -> tuple[frozenset[str], dict[str, bool]]:
    """A slot's native endpoints, and the finding they are read from: those ``listed`` in
    its manifest, else what its kind is taken to speak (``assumed``) as the finding
    ``kept`` in ``Slot.spoken`` corrects it, when it is of ``of`` (``key``)."""
    found = found_for(kept, of)
    return (frozenset(listed) if listed else native(assumed, found)), found


def source(listed: bool, found: Mapping[str, bool]) -> Source:
    """Where a slot's native endpoints come from."""
    if listed:
        return DECLARED
    return DISCOVERED if found else ASSUMED


def serving(offers: Set[str]) -> dict[str, Served]:
    """Every endpoint a slot speaking ``offers`` serves, and how: natively, or translated
    to one it speaks by a registered adapter. In the endpoint table's order."""
    translated = adapters.translations(offers)
    out: dict[str, Served] = {}
    for name in (*OFFERABLE, *sorted((set(offers) | translated) - set(OFFERABLE))):
        if name in offers:
            out[name] = NATIVE
        elif name in translated:
            # Sent as it came to an endpoint it speaks by another name (compact, of
            # responses): that is no translation.
            same = adapters.adapter_for(name, offers) is adapters.passthrough
            out[name] = NATIVE if same else TRANSLATED
    return out


def shown(offers: Set[str]) -> str:
    """``serving`` in words: "chat/completions, messages · translated"."""
    return ", ".join(
        name if how == NATIVE else f"{name} · {how}" for name, how in serving(offers).items()
    )
