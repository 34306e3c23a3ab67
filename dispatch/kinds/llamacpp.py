"""llama.cpp's ``llama-server`` (and llama-cpp-python's server, which answers to the same kind).

``GET /health`` at the server's root (not under ``/v1``) answers 503 ``{"error": {"message":
"Loading model"}}`` while the model loads and 200 once it is ready; ``GET /v1/models`` lists
the model (under its ``--alias``). In router mode (``--models-dir``/``--models-preset``, no
model of its own) ``/health`` answers 200 at once, and ``/v1/models`` (like ``/models``) lists
every model it can load, each with its ``status`` (``unloaded``, ``loading``, ``loaded``,
``sleeping``; ``failed`` with an ``exit_code`` after an instance died); a request loads its
model on demand. llama-cpp-python has no ``/health`` (404), and serves ``/v1/models`` only
between generations: the probe (``dispatch.lifecycle.probe``) reads a 404 there as "no health
endpoint", and a 404 with no ``/models`` answer as "busy".

Started with no model, ``llama-server`` is a *router* (tools/server/README.md, "Using
multiple models"; the code is server-models.cpp): it lists every model it can serve, each
entry with a ``status`` object (``value``: ``loaded``, ``loading``, ``unloaded``,
``sleeping``, ``downloading``, ``downloaded``; after a load that died, ``exit_code`` and
``failed: true`` beside ``unloaded``), spawns one child server per loaded model, and
answers ``POST /models/load`` and ``/models/unload`` (``{"model": id}`` → ``{"success":
true}``) as soon as it has started the child or asked it to stop: the load and the unload
go on after the answer, and ``GET /models/sse`` pushes each step. Its ``GET /props`` (no
``model`` parameter) says ``"role": "router"`` and how many models it keeps loaded at once
(``max_instances``, its ``--models-max``; 0: no limit). A single-model server lists entries
without ``status``: it says nothing of loading, and its one model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from dispatch.kinds.base import Call, Json, Kind, Loads, ModelLoad
from dispatch.kinds.urls import server_root
from dispatch.routing import states
from dispatch.routing.table import SlotEntry

# The router's status words for the states hal0web names alike (states.Load took its names
# from these), and the two of its own: a model being downloaded is on its way and not
# servable yet (a request waits, as for a load); a downloaded one is on disk, not in memory.
_STATUS: Mapping[str, str] = {
    states.LOADED: states.LOADED,
    states.LOAD_LOADING: states.LOAD_LOADING,
    states.UNLOADED: states.UNLOADED,
    states.SLEEPING: states.SLEEPING,
    "downloading": states.LOAD_LOADING,
    "downloaded": states.UNLOADED,
}

# The events /models/sse pushes with one model's new status: "model_status" (as the README
# names it, and as the router sends the start of a load) and "status_change" (what the router
# sends for every later step: progress, loaded, sleeping, unloaded with its exit code).
_STATUS_EVENTS = frozenset({"model_status", "status_change"})
_DOWNLOAD_PROGRESS = "download_progress"
# Events that change what the router lists: a model removed, the list reloaded, a download
# ended (the model is listed anew once the list is reloaded).
_LIST_EVENTS = frozenset({"model_remove", "models_reload", "download_finished", "download_failed"})

# The router's answers to a load of a model already running (loading, loaded or sleeping),
# and to an unload of one that is not: the state asked for is (being) reached.
_ALREADY = frozenset({"model is already running", "model is not running"})


class LlamaCpp(Kind):
    name = "llamacpp"
    label = "llama.cpp"

    # The router answers a load once it has spawned the model's server, and an unload once
    # it has asked it to stop; the readings (and /models/sse) say when either is done.
    # The router's `status` is read into the model's load state; it also carries the child
    # server's command line (`args`: file paths, its internal port) and its `preset`, which
    # no client of hal0web is to see.
    not_kept: ClassVar[frozenset[str]] = frozenset({"id", "object", "status"})
    load_call_waits: ClassVar[bool] = False
    unload_call_waits: ClassVar[bool] = False

    def knows(self, slot_type: str, loads: Loads | None) -> Mapping[str, bool]:
        # Only llama.cpp's own llama-server is a router (llama-cpp-python has no such mode),
        # and it speaks Anthropic Messages and the Responses API: a router is not asked. (Its
        # HTTP thread pool, which grows on demand, was seen to stop taking new connections
        # for good when a question came while the watcher's kept-alive connections and its
        # /models/sse stream held the base threads and a model was loading.) A router of a
        # build without one of them answers the first request for it "File Not Found", which
        # is written down then (dispatch.upstream.forward).
        if loads is not None and loads.loads_models:
            return dict.fromkeys(self.asks(slot_type), True)
        return {}

    def health_url(self, slot: SlotEntry) -> str | None:
        return server_root(slot) + "/health"

    def loads_url(self, slot: SlotEntry) -> str | None:
        # Only for the router's limit of loaded models: the listing says the rest.
        return server_root(slot) + "/props"

    def read_loads(self, listing_body: Json, health_body: Json, loads_body: Json) -> Loads | None:
        entries = _entries(listing_body)
        if not any(isinstance(e.get("status"), dict) for e in entries):
            return None  # a single-model server (or no listing read): its model is loaded
        models = {
            str(e["id"]): _status_load(e["status"])
            for e in entries
            if isinstance(e.get("id"), str) and isinstance(e.get("status"), dict)
        }
        return Loads(models=models, loads_models=True, model_limit=_router_limit(loads_body))

    def events_url(self, slot: SlotEntry) -> str | None:
        return server_root(slot) + "/models/sse"

    def read_event(self, event: str, data: Json) -> tuple[str, ModelLoad] | None:
        # The router writes bare ``data: {"model": ..., "event": ..., "data": {...}}`` lines,
        # no ``event:`` field: the event's name is inside the JSON.
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            return None
        name, inner = data.get("event"), data.get("data")
        if not isinstance(inner, dict):
            return None
        if name in _STATUS_EVENTS:
            status = inner.get("status")
            return (data["model"], _status_load({**inner, "value": status}))
        if name == _DOWNLOAD_PROGRESS:
            return (data["model"], ModelLoad(states.LOAD_LOADING, _download_progress(inner)))
        return None

    def event_rereads(self, event: str, data: Json) -> bool:
        return isinstance(data, dict) and data.get("event") in _LIST_EVENTS

    def load_call(self, slot: SlotEntry, model: str) -> Call | None:
        # Short: the router answers once the child is spawned (after unloading its least
        # recently used model when at --models-max, which waits for that child to exit).
        return Call("POST", server_root(slot) + "/models/load", {"model": model}, timeout_s=120.0)

    def unload_call(self, slot: SlotEntry, model: str) -> Call | None:
        return Call("POST", server_root(slot) + "/models/unload", {"model": model}, timeout_s=60.0)

    def call_failed(self, status: int | None, body: Json) -> str | None:
        if status == 400 and _error_message(body) in _ALREADY:
            return None
        return super().call_failed(status, body)


def _entries(listing_body: Json) -> list[dict[str, Any]]:
    data = listing_body.get("data") if isinstance(listing_body, dict) else None
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []


def _status_load(status: Mapping[str, Any]) -> ModelLoad:
    """One ``status`` object (a listing entry's, or an event's data with its ``status`` as
    ``value``) as a load state."""
    value = status.get("value")
    exit_code = status.get("exit_code")
    # The router keeps a non-zero exit code (and `failed: true`) on an unloaded model whose
    # server exited on its own: its last load (or its run) failed.
    if value == states.UNLOADED and isinstance(exit_code, int) and exit_code != 0:
        return ModelLoad(states.FAILED, error=f"its server exited with code {exit_code}")
    state = _STATUS.get(value) if isinstance(value, str) else None
    if state is None:
        return ModelLoad(states.UNLOADED)  # a word this kind does not know: not servable
    progress = status.get("progress")
    if value == "downloading":
        return ModelLoad(state, _download_progress(progress))
    if state == states.LOAD_LOADING:
        return ModelLoad(state, _load_progress(progress))
    return ModelLoad(state)


def _load_progress(progress: Json) -> float | None:
    """A load's progress over all its stages: the router reports ``value`` (0..1) within the
    ``current`` stage of ``stages`` (text model, draft model, projector), one after another."""
    if not isinstance(progress, dict):
        return None
    value = progress.get("value")
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    value = min(max(float(value), 0.0), 1.0)
    stages, current = progress.get("stages"), progress.get("current")
    if isinstance(stages, list) and stages and current in stages:
        return (stages.index(current) + value) / len(stages)
    return value


def _download_progress(progress: Json) -> float | None:
    """A download's progress: bytes done over bytes to do, summed over its files (``{url:
    {"done": n, "total": n}}``)."""
    if not isinstance(progress, dict):
        return None
    files = [f for f in progress.values() if isinstance(f, dict)]
    done = sum(f["done"] for f in files if isinstance(f.get("done"), int))
    total = sum(f["total"] for f in files if isinstance(f.get("total"), int))
    return min(done / total, 1.0) if total > 0 else None


def _router_limit(props: Json) -> int:
    """``--models-max`` as the router's ``/props`` says it; 0 when it does not (not a router,
    no answer) or sets none."""
    if not isinstance(props, dict) or props.get("role") != "router":
        return 0
    limit = props.get("max_instances")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 0


def _error_message(body: Json) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    return message if isinstance(message, str) else ""


KIND = LlamaCpp()
