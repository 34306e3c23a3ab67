"""The one interface every slot kind implements; its defaults are the generic
OpenAI-compatible server's behaviour. Pure: URLs and readings, no I/O."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from dispatch.kinds.urls import upstream_url
from dispatch.routing import states
from dispatch.routing.endpoints import defaults_for
from dispatch.routing.table import SlotEntry
from dispatch.wire.errors import excerpt

# JSON as the probe parsed it (None when the answer was not JSON).
Json = Any

# Fields of a /models entry that are not kept: hal0web writes its own id and object.
_NOT_KEPT = frozenset({"id", "object"})

# The endpoints asked about by default: those some OpenAI-compatible servers lack.
_IN_QUESTION = frozenset({"messages", "responses"})
# Answers to a question that say nothing of the route: the slot's key refused, too busy.
_NO_TELLING = frozenset({401, 403, 407, 408, 429})
# A framework's bare "no such route": "Not Found", "404: Not Found", "404 page not found",
# "File Not Found" (optionally ending in a full stop).
_NOT_FOUND = re.compile(
    r"(?:\d{3}\s*[:-]?\s*)?(?:(?:file|page|route|resource|path|url)\s+)?not\s+found\b[.!]?",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Listing:
    """What a server's ``/models`` said: the model ids, in its order, and for each the rest of
    its entry (context_length, capabilities, meta...)."""

    ids: tuple[str, ...]
    details: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model's load state as its server says it (``states.Load`` names)."""

    state: str
    progress: float | None = None  # 0..1, where the server reports it
    error: str = ""  # why the last load failed, in the server's words


@dataclass(frozen=True, slots=True)
class Loads:
    """What a server says of loading its models: the state of each model it can serve (by
    the id it knows it by), whether it loads and unloads them when asked, and how many it
    keeps loaded at once (0: no limit it tells)."""

    models: Mapping[str, ModelLoad]
    loads_models: bool = False
    model_limit: int = 0


@dataclass(frozen=True, slots=True)
class Call:
    """A request a kind wants made of its server: to load or unload a model."""

    method: str
    url: str
    body: Mapping[str, Any] | None = None
    # How long the call may take: a server that answers only once the model is in memory
    # (Lemonade, Ollama) holds it open for the whole load.
    timeout_s: float = 600.0


class Kind:
    """What hal0web knows of one kind of model server, and how it reads what the server says.

    Subclasses override only where their server differs from a plain OpenAI-compatible one.
    Every method is pure; the watcher (``dispatch.lifecycle.probe``) does the asking.

    The lifecycle's part is here too, per kind: which models a server has loaded (read at
    each probe, and pushed where the server pushes), and loading and unloading one.
    """

    name: ClassVar[str]  # the value stored in Slot.kind
    # Fields of a /models entry not kept among its upstream fields (hal0web writes its own
    # id and object; a kind drops what it reads into load states, or what must not leak).
    not_kept: ClassVar[frozenset[str]] = _NOT_KEPT
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
                str(m["id"]): {k: v for k, v in m.items() if k not in self.not_kept}
                for m in entries
            },
        )

    def listed_ids(self, body: object) -> tuple[str, ...]:
        """The model ids a ``/models`` answer lists (none when it lists none we read)."""
        listing = self.listing(body)
        return listing.ids if listing is not None else ()

    # --- loading and unloading models (dispatch.lifecycle.loader does the asking) -----------

    def loads_url(self, slot: SlotEntry) -> str | None:
        """Where the server says which of its models are loaded, asked at each probe beside
        ``/models``; None: ``/models`` (or the health answer) says it."""
        return None

    def read_loads(self, listing_body: Json, health_body: Json, loads_body: Json) -> Loads | None:
        """The load state of the server's models, from what the probe read: the ``/models``
        answer, the health answer and the ``loads_url`` answer (each None when not read).
        None: the server says nothing of loading, and every model it lists is loaded (a plain
        OpenAI-compatible server, a single-model server)."""
        return None

    def events_url(self, slot: SlotEntry) -> str | None:
        """A Server-Sent Events stream where the server pushes its models' state changes;
        None: it pushes nothing, the probe's readings are all there is."""
        return None

    def read_event(self, event: str, data: Json) -> tuple[str, ModelLoad] | None:
        """One pushed event as (the model's id on the server, its new load state); None for
        an event that says nothing of one model's load state.

        ``event`` is the SSE ``event:`` field ("" when the server sends none) and ``data`` the
        parsed JSON of its ``data:`` line(s), whole (a server that writes the event's name
        inside its JSON, as llama.cpp's router does, is read from ``data``)."""
        return None

    def event_rereads(self, event: str, data: Json) -> bool:
        """Whether a pushed event that ``read_event`` did not read into one model's state
        changed what the server lists (a model added or removed, the list reloaded): then the
        caller re-reads the whole list with a probe. By default: any named event."""
        return bool(event)

    def load_call(self, slot: SlotEntry, model: str) -> Call | None:
        """How to ask the server to load ``model`` (its id on the server); None: it cannot be
        asked."""
        return None

    def unload_call(self, slot: SlotEntry, model: str) -> Call | None:
        """How to ask the server to unload ``model``; None: it cannot be asked."""
        return None

    def call_failed(self, status: int | None, body: Json) -> str | None:
        """Why a load or unload call failed, in the server's words; None when it succeeded.
        ``status`` is None when the call got no answer."""
        if status is not None and 200 <= status < 300:
            if isinstance(body, dict) and body.get("success") is False:
                return _message(body) or "the server said it did not succeed"
            return None
        said = _message(body)
        if status is None:
            return said or "no answer"
        return f"{status}: {said}" if said else f"answered {status}"

    # Whether a successful load call means the model is loaded (the server held the call open
    # for the whole load); False: the call only starts it, and the probe's readings or the
    # pushed events say when it is done.
    load_call_waits: ClassVar[bool] = True
    # The same for an unload call: True when the server answers once the model is out of
    # memory; False when it only starts the unload (the readings say when it is gone).
    unload_call_waits: ClassVar[bool] = True

    def speaks(self, slot_type: str) -> frozenset[str]:
        """The endpoints (``dispatch.routing.endpoints`` names) this kind of server speaks
        natively for a slot of ``slot_type``, as far as the kind knows without asking it: its
        type's defaults. A manifest's ``endpoints`` list overrides it; so does what asking
        the server found (``asks``)."""
        return defaults_for(slot_type)

    # --- what the server speaks: asked once per readiness (dispatch.lifecycle.discovery) ----

    def asks(self, slot_type: str) -> frozenset[str]:
        """The endpoints worth asking the server whether it speaks, once each time it becomes
        ready: those not every server of this kind has. What ``speaks`` says of the others
        is certain (no question asked). By default the endpoints of other protocols than
        OpenAI's chat (Anthropic Messages, the Responses API), which some OpenAI-compatible
        servers lack: llama.cpp's ``llama-server`` has both, llama-cpp-python neither."""
        return frozenset(_IN_QUESTION & (self.speaks(slot_type) | defaults_for(slot_type)))

    def knows(self, slot_type: str, loads: Loads | None) -> Mapping[str, bool]:
        """What the probe's readings already tell of the endpoints ``asks`` names (``loads``:
        what the server said of loading its models, None when nothing): those need no
        question. By default nothing."""
        return {}

    def ask_call(self, slot: SlotEntry, endpoint: str) -> Call:
        """The cheap question whether the server speaks ``endpoint``: ``POST`` an empty JSON
        object to it. A server with the route refuses the body (400/422), one without it
        answers 404 or 405; neither generates, nor loads a model (llama.cpp's router answers
        "model name is missing" before it would)."""
        return Call("POST", upstream_url(slot, endpoint), {}, timeout_s=2.0)

    def spoke(self, status: int | None, body: Json, text: str) -> bool | None:
        """What the answer to ``ask_call`` says: True, the server has the route; False, it
        has not (``lacks_route``); None, no telling (no answer, its key refused, too busy, a
        gateway's or a loading server's 5xx, a 404 that says something of its own). A 500
        with a JSON error is the route's own refusal (llama-server's Messages says "'messages'
        is required" so)."""
        if status == 500 and body is not None:
            return True
        if status is None or status >= 500 or status in _NO_TELLING:
            return None
        if self.lacks_route(status, body, text):
            return False
        return None if status == 404 else True

    def lacks_route(self, status: int, body: Json, text: str) -> bool:
        """Whether an error answer means the server has no such route (not an answer of the
        route about this request): 405, or 404 with a framework's bare "not found" (FastAPI's
        ``{"detail": "Not Found"}``, llama-server's "File Not Found", Go's "404 page not
        found", an HTML page titled so). A model server's own 404 names what it did not find
        (a model, a response) and is the route's answer. ``body`` is the parsed JSON (None
        when not JSON), ``text`` the body as text."""
        if status == 405:
            return True
        if status != 404:
            return False
        if body is not None:
            said = _message(body).strip()
            return not said or _NOT_FOUND.fullmatch(said) is not None
        said = excerpt(text.encode()) if "<" in text else text.strip()
        return not said or _NOT_FOUND.match(said) is not None


def _message(body: Json) -> str:
    """An error message out of a JSON answer in the shapes servers use."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
        for key in ("error", "message", "detail", "status"):
            if isinstance(body.get(key), str):
                return str(body[key])
    if isinstance(body, str):
        return body[:300]
    return ""
