"""Ollama: OpenAI-compatible under ``/v1`` (``GET /v1/models``), with its own API beside it
at the server's root (docs/api.md in ollama/ollama): ``GET /api/tags`` (the models it has),
``GET /api/ps`` (the ones in memory now: ``{"models": [{"name": ..., "model": ...,
"expires_at": ..., "size_vram": ...}]}``) and ``POST /api/generate``.

``/v1/models`` answers as soon as it is up and lists what ``/api/tags`` does, by the same
names (``llama3.2:1b``, ``gemma3:latest``); ``/api/ps`` names the loaded ones alike. Ollama
loads a model on the first request that names it and unloads one when it needs the room (at
``OLLAMA_MAX_LOADED_MODELS``, which it does not report) or when the model's ``keep_alive``
ends. A generate request with no prompt loads the model and answers once it is in memory;
with ``"keep_alive": 0`` it unloads it, answering ``{"done_reason": "unload"}`` as soon as
it has asked its scheduler to (the model leaves ``/api/ps`` just after). Errors are
``{"error": "..."}``.

It speaks that API natively (``speaks``): a request to hal0web's ``/api/chat`` goes to its
``/api/chat`` as it came, where any other slot is sent it translated to OpenAI's API.
"""

from __future__ import annotations

from typing import ClassVar

from dispatch.kinds.base import Call, Json, Kind, Loads, ModelLoad
from dispatch.kinds.urls import server_root
from dispatch.routing import states
from dispatch.routing.endpoints import defaults_for, spoken_in
from dispatch.routing.table import SlotEntry
from dispatch.wire.protocols import OLLAMA


class Ollama(Kind):
    name = "ollama"
    label = "Ollama"

    unload_call_waits: ClassVar[bool] = False

    def speaks(self, slot_type: str) -> frozenset[str]:
        """Its type's OpenAI endpoints (under /v1) and Ollama's own API for the type."""
        return defaults_for(slot_type) | spoken_in(OLLAMA, slot_type)

    def loads_url(self, slot: SlotEntry) -> str | None:
        return server_root(slot) + "/api/ps"

    def read_loads(self, listing_body: Json, health_body: Json, loads_body: Json) -> Loads | None:
        if not isinstance(loads_body, dict) or not isinstance(loads_body.get("models"), list):
            return None  # no /api/ps read: nothing known of its loads
        running = {
            name
            for m in loads_body["models"]
            if isinstance(m, dict)
            for name in (m.get("name"), m.get("model"))
            if isinstance(name, str)
        }
        models = {m: ModelLoad(states.UNLOADED) for m in self.listed_ids(listing_body)}
        models.update({m: ModelLoad(states.LOADED) for m in running})
        return Loads(models=models, loads_models=True)

    def load_call(self, slot: SlotEntry, model: str) -> Call | None:
        body: dict[str, object] = {"model": model, "stream": False}
        if slot.unload_idle_s:
            # hal0web unloads it when idle (the slot's unload_idle_s): Ollama is to keep it
            # until then, not drop it after its own OLLAMA_KEEP_ALIVE.
            body["keep_alive"] = -1
        # Otherwise the model stays as long as the server's own setting says (5 minutes
        # unless OLLAMA_KEEP_ALIVE is set), as after any request it serves.
        return Call("POST", server_root(slot) + "/api/generate", body)

    def unload_call(self, slot: SlotEntry, model: str) -> Call | None:
        body = {"model": model, "keep_alive": 0, "stream": False}
        return Call("POST", server_root(slot) + "/api/generate", body, timeout_s=60.0)


KIND = Ollama()
