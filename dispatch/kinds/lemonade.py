"""Lemonade Server: OpenAI-compatible under ``/api/v1``, with its own endpoints beside it
(docs/api/lemonade.md in lemonade-sdk/lemonade).

``GET /api/v1/models`` lists the models it has downloaded (each one it can serve), loaded or
not. ``GET /api/v1/health`` answers 200 with ``{"status": "ok", "model_loaded": <the most
recently used model, or null>, "all_models_loaded": [{"model_name": ..., "type": "llm",
"last_use": ..., "pinned": ..., ...}], "max_models": {"llm": N, "embedding": N, ...}}``:
which models are in memory, and how many of each type it keeps there (its
``max_loaded_models``; -1: no limit). An older server says only ``model_loaded``.

It loads a model itself on the first request that names it, unloading its least recently
used one of the type when it is at its limit; after a load that fails it unloads every model
and tries once more. ``POST /api/v1/load`` ``{"model_name": m}`` answers once the model is
loaded (``{"status": "success", ...}``), ``POST /api/v1/unload`` ``{"model_name": m}`` once
it is gone; errors are ``{"error": {"message": ..., "code": "model_load_error", ...}}`` (404
for a model it does not know, 409 when every loaded one is pinned, 500 for a failed load),
``{"error": "..."}`` for an unload, or the documented ``{"status": "error", "message": ...}``.

Up with no model loaded, it is ready: its slot's state says it answers, and the models' load
states say none is loaded yet (a request for one waits for its load).
"""

from __future__ import annotations

from typing import Any

from dispatch.kinds.base import Call, Json, Kind, Loads, ModelLoad
from dispatch.kinds.urls import upstream_url
from dispatch.routing import states
from dispatch.routing.table import SlotEntry

# The type whose limit is the slot's: hal0web's Lemonade slots serve chat models. (The
# server keeps a limit per type; a slot's other models count against their own.)
_LIMIT_TYPE = "llm"

# Its answer to an unload of a model that is not loaded (Router::unload_model).
_NOT_LOADED = "Model not loaded: "


class Lemonade(Kind):
    name = "lemonade"
    label = "Lemonade"

    def health_url(self, slot: SlotEntry) -> str | None:
        return upstream_url(slot, "health")  # the API root is .../api/v1

    def read_loads(self, listing_body: Json, health_body: Json, loads_body: Json) -> Loads | None:
        if not isinstance(health_body, dict):
            # No health answer read: nothing known of its loads. Taken as a plain server
            # (what it lists is servable), which Lemonade is too: it loads on demand.
            return None
        loaded = _loaded(health_body)
        models = {m: ModelLoad(states.UNLOADED) for m in self.listed_ids(listing_body)}
        models.update({m: ModelLoad(states.LOADED) for m in loaded})
        return Loads(models=models, loads_models=True, model_limit=_limit(health_body))

    def load_call(self, slot: SlotEntry, model: str) -> Call | None:
        return Call("POST", upstream_url(slot, "load"), {"model_name": model})

    def unload_call(self, slot: SlotEntry, model: str) -> Call | None:
        # Lemonade waits for the model's requests in flight to finish before it unloads it.
        return Call("POST", upstream_url(slot, "unload"), {"model_name": model})

    def call_failed(self, status: int | None, body: Json) -> str | None:
        if (
            status == 404
            and isinstance(body, dict)
            and str(body.get("error")).startswith(_NOT_LOADED)
        ):
            return None  # an unload of a model not in memory: it is unloaded already
        # Its documented error answer: {"status": "error", "message": ...}.
        if isinstance(body, dict) and body.get("status") == "error":
            said = body.get("message")
            reason = said if isinstance(said, str) and said else "the server said error"
            return f"{status}: {reason}" if status is not None and status >= 300 else reason
        return super().call_failed(status, body)


def _loaded(health: dict[str, Any]) -> list[str]:
    """The models in memory: ``all_models_loaded``'s names, or an older server's one
    ``model_loaded``."""
    every = health.get("all_models_loaded")
    if isinstance(every, list):
        return [
            str(m["model_name"])
            for m in every
            if isinstance(m, dict) and isinstance(m.get("model_name"), str)
        ]
    one = health.get("model_loaded")
    return [one] if isinstance(one, str) and one else []


def _limit(health: dict[str, Any]) -> int:
    limits = health.get("max_models")
    limit = limits.get(_LIMIT_TYPE) if isinstance(limits, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit
    return 0  # not said, or -1: no limit


KIND = Lemonade()
