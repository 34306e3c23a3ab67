"""/v1/models and /v1/models/{id}, answered from the routing table as the caller's key sees it.

Each entry says where its model is, as llama.cpp's router does (``status: {"value":
"loaded"}``, with ``progress`` while loading, ``failed`` and ``error`` after a failed load), so
Open WebUI and other clients see the truth; the ``hal0`` object says it per slot, with the pin,
what choosing the model there would unload first, and the endpoints the slot serves (natively
or translated). Beside ``data``, ``models`` lists the same models as Codex reads them
(``dispatch.api.codex_models``).
"""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from dispatch.api import codex_models
from dispatch.api.keys import authorize
from dispatch.api.responses import fail
from dispatch.coordination.store import store
from dispatch.lib import redact
from dispatch.routing import eviction, speaks, states
from dispatch.routing.endpoints import BY_NAME
from dispatch.routing.resolver import candidates
from dispatch.routing.scopes import Scope, model_names
from dispatch.routing.table import RoutingTable, SlotEntry
from dispatch.upstream.admission import admission
from dispatch.wire.errors import ApiError

# What the upstream's own listing may carry that is not the client's to see: llama.cpp's
# router puts the command line of each model's child process (paths, flags, API keys on
# it) in ``status.args``, and its preset in ``preset``. Dropped wherever they appear.
_NEVER_SHOWN = frozenset({"args", "preset"})


def _scrubbed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items() if k not in _NEVER_SHOWN}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


def _entry(
    model_id: str, fields: Any, owner: str, status: dict[str, Any], hal0: dict[str, Any]
) -> dict[str, Any]:
    """One /v1/models entry: the upstream's own fields (context_length, capabilities, meta,
    created, owned_by...) as its /models gave them, less what must not leak, hal0web's id,
    the model's load status and the `hal0` object."""
    return {
        "created": 0,
        "owned_by": owner,
        **_scrubbed(dict(fields)),
        "id": model_id,
        "object": "model",
        "status": status,
        "hal0": hal0,
    }


def _status(slot: SlotEntry, model_id: str) -> dict[str, Any]:
    """The model's load state on ``slot``, in llama.cpp's router's shape."""
    model = slot.models[model_id]
    status: dict[str, Any] = {"value": model.load}
    if model.load == states.LOAD_LOADING and model.progress is not None:
        status["progress"] = model.progress
    if model.load == states.FAILED:
        status["failed"] = True
        status["error"] = redact.masked(model.load_error)
    return status


def _load(slot: SlotEntry, model_id: str) -> dict[str, Any]:
    """The `hal0` object's word on the model's load there: its state, progress and failure,
    whether it is pinned, and which model (its server's id) choosing it would unload first."""
    model = slot.models[model_id]
    return {
        "load": model.load,
        # Only where they mean something (a progress left from a finished load would not).
        "progress": model.progress if model.load == states.LOAD_LOADING else None,
        "load_error": redact.masked(model.load_error) if model.load == states.FAILED else None,
        "pinned": model.pinned,
        "would_unload": eviction.would_unload(slot, model_id),
    }


def _patterns(slot: SlotEntry, model_id: str) -> dict[str, Any]:
    """The slot's alias patterns that stand for ``model_id`` (as ``{"patterns": [...]}``, or
    nothing when none does). A pattern is no model id a client could list and send as it is,
    so it is never an entry of its own: it is said here, in the `hal0` object of the model
    it names."""
    found = [m.model_id for m in slot.models.values() if m.pattern and m.upstream_model == model_id]
    return {"patterns": sorted(found)} if found else {}


def _endpoints(slot: SlotEntry) -> dict[str, Any]:
    """The `hal0` object's word on what the slot serves: ``endpoints``, those its server
    speaks natively (as before translations came); ``serves``, every endpoint it serves
    and how (``{"chat/completions": "native", "messages": "translated"}``); and where the
    native ones come from (``manifest``, ``server`` when asked, ``kind`` until then)."""
    return {
        "endpoints": sorted(slot.endpoints),
        "serves": speaks.serving(slot.endpoints),
        "endpoints_from": speaks.source(slot.endpoints_listed, slot.spoken),
    }


def _model_entries(table: RoutingTable, everything: bool, scope: Scope) -> list[dict[str, Any]]:
    """Each model once, by its bare id, with the slots serving it (hal0web picks and fails
    over among them). With ``everything`` also the aliases and each slot/model pair: a
    client's model list would show each model two or three times (llama-swap's
    ``includeAliasesInList``). Every listed id routes. Only what ``scope`` allows is
    listed: a key's model allowlist shows in its /v1/models as in its routing."""
    inflight = admission.inflight
    data: list[dict[str, Any]] = []
    for model_id in table.known_ids:
        ranked = [
            c
            for c in candidates(table, model_id, inflight)
            if scope.allows(model_names(c[0], model_id))
        ]
        if not ranked:
            continue
        # Aliases only on request; but a key that may use a model by its alias alone sees
        # the alias (every listed id routes, for the key that lists it).
        if (
            not everything
            and all(s == "alias" for _, _, s in ranked)
            and (
                scope.everything
                or any(scope.allows(model_names(slot, up or "")) for slot, up, _ in ranked)
            )
        ):
            continue
        first = ranked[0][0]
        # Loaded if any slot has it ready to answer, else as the first slot has it.
        ready = [s for s, _, _ in ranked if s.models[model_id].load in states.SERVABLE]
        data.append(
            _entry(
                model_id,
                _upstream_fields(first, model_id),
                first.name,
                _status((ready or [first])[0], model_id),
                {
                    "slots": [
                        {
                            "name": slot.name,
                            "state": slot.state,
                            "source": source,
                            **_endpoints(slot),
                            **_load(slot, model_id),
                            **_patterns(slot, model_id),
                        }
                        for slot, _, source in ranked
                    ]
                },
            )
        )
    if not everything:
        return data
    for slot in table.slots.values():
        if not slot.enabled:
            continue
        for model_id, model in slot.models.items():
            if model.pattern or not scope.allows(model_names(slot, model_id)):
                continue
            data.append(
                _entry(
                    f"{slot.name}/{model_id}",
                    _upstream_fields(slot, model_id),
                    slot.name,
                    _status(slot, model_id),
                    {
                        "slot": slot.name,
                        "state": slot.state,
                        "source": model.source,
                        **_endpoints(slot),
                        **_load(slot, model_id),
                        **_patterns(slot, model_id),
                    },
                )
            )
    return data


def _upstream_fields(slot: Any, model_id: str) -> Any:
    """What the slot's server said of the model (an alias: of the model it stands for)."""
    model = slot.models[model_id]
    if model.source == "alias":
        target = slot.models.get(model.upstream_model)
        return target.upstream_fields if target is not None else {}
    return model.upstream_fields


# What Ollama's /api/tags, /api/ps and /api/show list (dispatch/api/ollama_models.py).
listed = _model_entries


def list_all(request: HttpRequest) -> bool:
    flag = request.GET.get("all")
    if flag is None:
        return bool(settings.HAL0_MODELS_LIST_ALL)
    return flag.strip().lower() in ("1", "true", "yes", "on")


_MODELS_KEY_HEADER = BY_NAME["models"].key_header


async def models(request: HttpRequest) -> HttpResponse:
    try:
        caller = await authorize(request, _MODELS_KEY_HEADER)
    except ApiError as err:
        return fail(request, err)
    table = await store.ensure_loaded()
    data = _model_entries(table, list_all(request), caller.scope)
    # `models`: the same list in the shape Codex reads (dispatch.api.codex_models).
    listing = {"object": "list", "data": data, "models": codex_models.models(data)}
    return HttpResponse(orjson.dumps(listing), content_type="application/json")


async def model_detail(request: HttpRequest, model_id: str) -> HttpResponse:
    try:
        caller = await authorize(request, _MODELS_KEY_HEADER)
    except ApiError as err:
        return fail(request, err)
    table = await store.ensure_loaded()
    # A model out of the key's scope is as unknown to it as one nobody serves.
    for entry in _model_entries(table, True, caller.scope):
        if entry["id"] == model_id:
            return HttpResponse(orjson.dumps(entry), content_type="application/json")
    return fail(
        request,
        ApiError(404, "model_not_found", f"The model '{model_id}' does not exist.", param="model"),
    )
