"""The one interface every slot kind implements; its defaults are the generic
OpenAI-compatible server's behaviour. Pure: URLs and readings, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dispatch.kinds.urls import upstream_url
from dispatch.routing import states
from dispatch.routing.table import SlotEntry

# Fields of a /models entry that are not kept: hal0web writes its own id and object.
_NOT_KEPT = frozenset({"id", "object"})


@dataclass(frozen=True, slots=True)
class Listing:
    """What a server's ``/models`` said: the model ids, in its order, and for each the rest of
    its entry (context_length, capabilities, meta...)."""

    ids: tuple[str, ...]
    details: Mapping[str, Mapping[str, Any]]


class Kind:
    """What hal0web knows of one kind of model server, and how it reads what the server says.

    Subclasses override only where their server differs from a plain OpenAI-compatible one.
    Every method is pure; the watcher (``dispatch.lifecycle.probe``) does the asking.

    The slot lifecycle will add its part here, per kind: which models a server has loaded,
    and loading and unloading one.
    """

    name: ClassVar[str]  # the value stored in Slot.kind
    label: ClassVar[str]  # as the admin shows it

    def health_url(self, slot: SlotEntry) -> str | None:
        """The health endpoint probed next to ``/models``; None: the server has none that
        says more than ``/models`` does."""
        return None

    def models_url(self, slot: SlotEntry) -> str:
        """Where the server lists the models it serves (OpenAI's ``GET /models``)."""
        return upstream_url(slot, "models")

    def classify(
        self, health_status: int | None, health_body: object, models_status: int | None
    ) -> str:
        """What a probe saw, as a state: ``offline``, ``loading``, ``ready`` or ``error``.

        ``health_status`` is None when there was no health answer (or no health endpoint).
        """
        if models_status is None and health_status is None:
            return states.OFFLINE
        if health_status == 503:
            return states.LOADING  # a health endpoint's way to say "not yet" (llama.cpp's)
        if models_status is None:
            return states.OFFLINE
        if models_status == 200:
            return states.READY
        if models_status == 503:
            return states.LOADING
        return states.ERROR

    def listing(self, body: object) -> Listing | None:
        """The models a ``/models`` answer (parsed JSON) lists; None when it lists none in a
        form we read (then what the slot knows stands)."""
        if not isinstance(body, dict):
            return None
        data = body.get("data")
        if not isinstance(data, list):
            return None
        entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        return Listing(
            ids=tuple(str(m["id"]) for m in entries),
            details={
                str(m["id"]): {k: v for k, v in m.items() if k not in _NOT_KEPT} for m in entries
            },
        )

    def endpoints(self, slot: SlotEntry) -> frozenset[str]:
        """The endpoints (``dispatch.routing.endpoints`` names) the server speaks: for now
        what the slot says (its manifest's list, or its type's defaults). A kind that can
        ask its server will answer from what it says."""
        return slot.endpoints
