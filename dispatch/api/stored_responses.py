"""Requests about a response hal0web keeps itself (one it translated for a slot that speaks
only chat, whose id it issued: ``resp_hal0…``): ``GET``/``DELETE /v1/responses/{id}`` and
``.../input_items`` answered from the store, on any worker; ``previous_response_id``'s
conversation looked up for the request that continues it.

An id of that shape hal0web does not keep (another hal0web in front of this one made it)
is followed to its slot like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.http import HttpRequest, HttpResponse

from dispatch.api.responses import visible
from dispatch.coordination import stored_responses
from dispatch.coordination.stored_responses import Stored
from dispatch.observability.decisions import DecisionRecord, record
from dispatch.routing.endpoints import Endpoint
from dispatch.routing.scopes import Scope
from dispatch.wire.errors import ApiError, dumps, invalid_request
from dispatch.wire.translators.responses_chat import is_ours

__all__ = ["answer", "conversation", "is_ours"]

# input_items' pages, as OpenAI's: 20 by default, at most 100.
_PAGE, _MOST = 20, 100
# What X-Hal0-Resolution says of an answer from the store.
STORED = "stored"


def _allowed(stored: Stored, scope: Scope, rec: DecisionRecord) -> None:
    """A key with a model allowlist reaches only responses of models it may use."""
    if not scope.allows(stored.names):
        raise ApiError(
            403,
            "model_not_allowed",
            f"This API key ({rec.client}) may not use the model '{stored.model}' this "
            f"response was made with; its models: {', '.join(scope.patterns)}.",
        )


def _limit(query: Mapping[str, str]) -> int:
    given = query.get("limit")
    if given is None:
        return _PAGE
    if not given.isdigit() or not 1 <= int(given) <= _MOST:
        raise invalid_request(f"'limit' must be a whole number from 1 to {_MOST}.", "limit")
    return int(given)


def _page(items: list[dict[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """One page of ``items`` (oldest first), as OpenAI's cursor lists: newest first unless
    ``order=asc``, from after the item ``after`` names (or up to the one ``before`` does)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid_request("'order' must be asc or desc.", "order")
    ordered = items if order == "asc" else items[::-1]
    ids = [item.get("id") for item in ordered]
    start, end = 0, len(ordered)
    for param in ("after", "before"):
        cursor = query.get(param)
        if cursor is None:
            continue
        if cursor not in ids:
            raise invalid_request(f"No input item with id '{cursor}' in this response.", param)
        if param == "after":
            start = ids.index(cursor) + 1
        else:
            end = ids.index(cursor)
    limit = _limit(query)
    data = ordered[start:end][:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": start + limit < end,
    }


async def _body(ep: Endpoint, request: HttpRequest, rid: str, stored: Stored) -> Any:
    if ep.name == "responses/{id}/input_items":
        # Everything the model was given: the conversation before, then this request's input.
        return _page([*stored.history, *stored.items], request.GET)
    if ep.name == "responses/{id}/cancel":
        raise ApiError(
            400,
            "invalid_request_error",
            f"Response '{rid}' is complete: only background responses can be cancelled.",
        )
    if request.method == "DELETE":
        await stored_responses.delete(rid)
        return {"id": rid, "object": "response", "deleted": True}
    return stored.response


async def answer(
    ep: Endpoint, request: HttpRequest, rid: str, scope: Scope, rec: DecisionRecord
) -> HttpResponse | None:
    """hal0web's answer about response ``rid`` from its store; None when it does not keep it."""
    stored = await stored_responses.find(rid)
    if stored is None:
        return None
    _allowed(stored, scope, rec)
    response = HttpResponse(
        dumps(await _body(ep, request, rid, stored)), content_type="application/json"
    )
    rec.resolution_path, rec.status = STORED, 200
    rec.model = stored.model or None
    visible(response, rec)
    rec.ended(by_us=True)
    record(rec)
    return response


async def conversation(rid: str, scope: Scope, rec: DecisionRecord) -> list[dict[str, Any]] | None:
    """The items a request continuing response ``rid`` follows (None: not kept here)."""
    stored = await stored_responses.find(rid)
    if stored is None:
        return None
    _allowed(stored, scope, rec)
    return stored.conversation
