"""Where a request goes: its model resolved, or its response id followed, in the key's scope."""

from __future__ import annotations

from dispatch.conf import conf
from dispatch.coordination.affinity import affinity
from dispatch.coordination.store import store
from dispatch.lifecycle.watcher import cold_probe
from dispatch.observability.decisions import DecisionRecord
from dispatch.routing.resolver import Decision, NoRoute, pinned, resolve
from dispatch.routing.scopes import EVERYTHING, Scope, model_names
from dispatch.routing.table import RoutingTable
from dispatch.upstream.admission import admission
from dispatch.wire.errors import ApiError


async def decide(
    table: RoutingTable,
    model: str | None,
    endpoint: str,
    rec: DecisionRecord,
    scope: Scope,
    response_id: str | None,
) -> Decision:
    """Where the request goes: the slot holding ``response_id`` when it names one, else
    where its model resolves. Raises the client's ApiError when nowhere."""
    rec.cache_state = "stale" if store.stale else "fresh"
    if response_id is not None:
        return await _follow(table, response_id, model, endpoint, rec, scope)
    fallback = conf.HAL0_FALLBACK_SLOT
    result = resolve(table, model, endpoint, admission.inflight, fallback)
    if isinstance(result, NoRoute) and result.code == "model_not_found" and table.unprobed:
        # Cold start: some slot has not been asked what it serves yet. Ask (once, shared by
        # every request that misses now), then look again before turning the request away.
        rec.cache_state = "cold"
        await cold_probe()
        result = resolve(store.table, model, endpoint, admission.inflight, fallback)
    return _decided(result, rec, scope, model)


def _decided(
    result: Decision | NoRoute, rec: DecisionRecord, scope: Scope, model: str | None
) -> Decision:
    """Note what was decided in the record; a NoRoute is the client's error, and so is a
    decision none of whose slots the caller's key may use for ``model``."""
    if isinstance(result, Decision) and not scope.everything:
        narrowed = scope.narrow(result)
        if narrowed is None:
            rec.decided(result, allowed=False)
            raise _not_allowed(rec, scope, model)
        result = narrowed
    if isinstance(result, NoRoute):
        rec.decided(result)
        param = "model" if result.code != "response_not_found" else None
        raise ApiError(result.status, result.code, result.message, param=param)
    # The counts the ranking saw, kept for the explanation (they move on at once).
    inflight = admission.inflight
    rec.decided(result, tuple(inflight.get(t.slot.name, 0) for t in result.targets))
    return result


def _not_allowed(rec: DecisionRecord, scope: Scope, model: str | None) -> ApiError:
    shown = "the default model" if model is None else f"the model '{model}'"
    return ApiError(
        403,
        "model_not_allowed",
        f"This API key ({rec.client}) may not use {shown}; its models: "
        f"{', '.join(scope.patterns)}.",
        param="model",
    )


async def _follow(
    table: RoutingTable,
    rid: str,
    model: str | None,
    endpoint: str,
    rec: DecisionRecord,
    scope: Scope,
) -> Decision:
    """The slot that made response ``rid``: it alone holds it. Never a guess: an id hal0web
    did not see made is a 404."""
    slot = await affinity.lookup(rid)
    if slot is None:
        raise ApiError(
            404,
            "response_not_found",
            f"No response with id '{rid}' was made through hal0web (or it is older than "
            f"HAL0_RESPONSE_RETENTION_DAYS = {conf.HAL0_RESPONSE_RETENTION_DAYS:g}).",
        )
    decision = pinned(table, slot, model, endpoint, rid)
    if model is None and isinstance(decision, Decision) and not scope.everything:
        # A response read or cancelled by its id names no model: the key needs a model it
        # may use on that slot (ids are unguessable; the slot is what it reaches).
        pinned_slot = decision.target.slot
        if not any(scope.allows(model_names(pinned_slot, m)) for m in pinned_slot.models):
            rec.decided(decision, allowed=False)
            raise _not_allowed(rec, scope, model)
        return _decided(decision, rec, EVERYTHING, model)
    return _decided(decision, rec, scope, model)
