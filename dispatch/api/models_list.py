"""/v1/models and /v1/models/{id}, answered from the routing table as the caller's key sees it."""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from django.http import HttpRequest, HttpResponse

from dispatch.api.keys import authorize
from dispatch.api.responses import fail
from dispatch.coordination.store import store
from dispatch.routing.endpoints import BY_NAME
from dispatch.routing.resolver import candidates
from dispatch.routing.scopes import Scope, model_names
from dispatch.routing.table import RoutingTable
from dispatch.upstream.admission import admission
from dispatch.wire.errors import ApiError


def _entry(model_id: str, fields: Any, owner: str, hal0: dict[str, Any]) -> dict[str, Any]:
    """One /v1/models entry: the upstream's own fields (context_length, capabilities, meta,
    created, owned_by...) as its /models gave them, hal0web's id, and the `hal0` object."""
    return {
        "created": 0,
        "owned_by": owner,
        **fields,
        "id": model_id,
        "object": "model",
        "hal0": hal0,
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
        data.append(
            _entry(
                model_id,
                _upstream_fields(first, model_id),
                first.name,
                {
                    "slots": [
                        {
                            "name": slot.name,
                            "state": slot.state,
                            "source": source,
                            "endpoints": sorted(slot.endpoints),
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
            if not scope.allows(model_names(slot, model_id)):
                continue
            data.append(
                _entry(
                    f"{slot.name}/{model_id}",
                    _upstream_fields(slot, model_id),
                    slot.name,
                    {
                        "slot": slot.name,
                        "state": slot.state,
                        "source": model.source,
                        "endpoints": sorted(slot.endpoints),
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


def _list_all(request: HttpRequest) -> bool:
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
    return HttpResponse(
        orjson.dumps(
            {"object": "list", "data": _model_entries(table, _list_all(request), caller.scope)}
        ),
        content_type="application/json",
    )


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
