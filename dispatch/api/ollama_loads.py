"""Ollama's requests that only load or unload a model: a chat with no messages, a generate
with no prompt, an embed with no input load it; with ``"keep_alive": 0`` they unload it
(docs/api.md in ollama/ollama, "Load a model", "Unload a model").

On a slot whose server loads models when asked (``SlotEntry.loads_models``: models on
demand), hal0web does it through its own loader, the same path as any request's load and an
operator's unload (``dispatch.upstream.loads``, ``dispatch.lifecycle.control``), and answers
``done_reason: "load"`` once the model is loaded, ``"unload"`` once the unload is asked.
Elsewhere: a server that speaks Ollama's API itself is sent the request as it came; any other
keeps its models as it keeps them, so the request is accepted, nothing is done, and the
answer says so (``X-Hal0-Keep-Alive: ignored``) and never claims an unload.

Other ``keep_alive`` values ride on ordinary requests: an Ollama server is sent them, a
translated request drops them (hal0web's ``unload_idle_s`` says when a model goes).
"""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpResponse

from dispatch.api.responses import visible
from dispatch.coordination.store import store
from dispatch.lifecycle import control
from dispatch.observability.decisions import DecisionRecord, record
from dispatch.routing import eviction
from dispatch.routing.endpoints import Endpoint
from dispatch.routing.resolver import Decision
from dispatch.routing.table import ModelEntry, SlotEntry
from dispatch.upstream.loads import loads
from dispatch.wire.adapters import ClientRequest
from dispatch.wire.errors import ApiError, dumps
from dispatch.wire.translators.ollama_from_openai import created_at
from dispatch.wire.translators.ollama_openai import (
    CHAT,
    EMBED,
    EMBEDDINGS,
    GENERATE,
    keep_alive_zero,
)

LOAD, UNLOAD = "load", "unload"  # Ollama's done_reason for each
HEADER = "X-Hal0-Keep-Alive"
# Where each endpoint's request carries what it asks the model: none of it is a load.
_WORK = {CHAT: "messages", GENERATE: "prompt", EMBED: "input", EMBEDDINGS: "prompt"}


def asked(endpoint: str, data: dict[str, Any] | None) -> str | None:
    """LOAD or UNLOAD when the request only loads or unloads its model, else None."""
    key = _WORK.get(endpoint)
    if key is None or data is None:
        return None
    if data.get(key) not in (None, "", []) or (endpoint == GENERATE and data.get("images")):
        return None
    return UNLOAD if keep_alive_zero(data.get("keep_alive")) else LOAD


def _answer(endpoint: str, model: str, reason: str | None) -> dict[str, Any]:
    if endpoint == EMBEDDINGS:
        return {"embedding": []}
    if endpoint == EMBED:
        return {"model": model, "embeddings": []}
    said: dict[str, Any] = {"model": model, "created_at": created_at()}
    if endpoint == CHAT:
        said["message"] = {"role": "assistant", "content": ""}
    else:
        said["response"] = ""
    said["done"] = True
    if reason is not None:
        said["done_reason"] = reason
    return said


def _model(slot: SlotEntry, decision: Decision) -> ModelEntry | None:
    """The slot's entry for the model decided on (an alias: the model it names)."""
    model = slot.models.get(decision.requested_model or "")
    upstream = decision.target.upstream_model or ""
    if model is None or model.upstream_model != upstream:
        model = eviction.served(slot).get(upstream)
    return model


async def _act(slot: SlotEntry, model: ModelEntry, what: str, rec: DecisionRecord) -> None:
    """Load (waiting until it is loaded) or ask the unload, as the loader does either."""
    if what == UNLOAD:
        try:
            await sync_to_async(control.ask)(slot.name, model.model_id, control.UNLOAD)
        except control.ControlError as exc:
            raise ApiError(409, "unload_refused", f"hal0web does not unload it: {exc}") from None
        return
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        await loads.wait(slot, model, None, rec.request_id)
    finally:
        rec.queued_ms = (loop.time() - began) * 1000


async def answered(
    ep: Endpoint, decision: Decision, client: ClientRequest, rec: DecisionRecord
) -> HttpResponse | None:
    """hal0web's answer to a request that only loads or unloads its model; None for any
    other request (and for a server that speaks Ollama's API and loads by itself)."""
    data = client.body.json()
    what = asked(ep.name, data)
    if what is None:
        return None
    target = decision.target
    slot = store.table.slots.get(target.slot.name) or target.slot
    model = _model(slot, decision) if slot.loads_models else None
    headers: dict[str, str] = {}
    reason: str | None = what
    if model is not None:
        await _act(slot, model, what, rec)
    elif ep.offer in target.slot.endpoints:
        return None  # an Ollama server: its own loading, as it came
    else:
        headers[HEADER] = f"ignored; slot '{slot.name}' keeps its models loaded as it does"
        reason = LOAD if what == LOAD else None  # it serves the model; it unloaded nothing
    asked_model = data.get("model") if isinstance(data, dict) else None
    name = asked_model if isinstance(asked_model, str) else target.upstream_model or ""
    response = HttpResponse(dumps(_answer(ep.name, name, reason)), content_type="application/json")
    for key, value in headers.items():
        response[key] = value
    rec.status = 200
    visible(response, rec)
    rec.ended(by_us=True)
    record(rec)
    return response
