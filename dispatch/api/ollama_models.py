"""Ollama's model endpoints, answered from the routing table as /v1/models is (and within the
caller's key scope): ``/api/tags`` (every model hal0web routes that Ollama's API can reach),
``/api/ps`` (the ones loaded now, and when hal0web would unload each), ``/api/show`` (one
model: its capabilities, context length, details) and ``/api/version``.

hal0web knows what the slots' model lists say (``ModelEntry.upstream_fields``): a detail
no listing gives is left empty (or 0), never made up. Ollama's names carry a tag
(``gemma3:latest``); ``known_name`` lets ``:latest`` go where hal0web knows the model
without it, and add it where only the tagged name is known.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse

from dispatch.api import bodies, models_list
from dispatch.api.keys import authorize
from dispatch.api.responses import fail
from dispatch.coordination.store import store
from dispatch.routing import states
from dispatch.routing.endpoints import BY_NAME
from dispatch.routing.scopes import Scope
from dispatch.routing.table import RoutingTable, SlotEntry
from dispatch.upstream.loads import loads
from dispatch.wire import adapters
from dispatch.wire.errors import ApiError
from dispatch.wire.protocols import OLLAMA
from dispatch.wire.translators.ollama_openai import CHAT, EMBED, GENERATE

# The Ollama release whose API hal0web answers as (capabilities in /api/show, thinking,
# streamed tool calls): clients gate what they use on it (VS Code's asks at least 0.6.4).
VERSION = "0.12.3"
_TAG = ":latest"
# Ollama's expires_at for a model kept loaded until asked otherwise (keep_alive -1).
_NEVER = datetime(2318, 1, 1, tzinfo=UTC)
# A quantization as GGUF file and model names spell it (Q4_K_M, IQ3_XXS, Q8_0, BF16).
_QUANT = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.I)
# What model lists call a capability, as Ollama names it: those a listing tells of the
# model itself. Completion, tools and embedding are what its slots serve, whatever a
# listing says (llama.cpp's says "completion" of an embedding model too).
_CAPABILITIES = {
    "vision": "vision",
    "multimodal": "vision",  # llama.cpp's
    "thinking": "thinking",
    "reasoning": "thinking",  # Lemonade's labels
    "insert": "insert",
}
_KEY_HEADER = BY_NAME["api/tags"].key_header
# The architecture named where no listing says it (beside a context length it does say).
_NO_ARCH = "unspecified"


def _known(table: RoutingTable, name: str) -> bool:
    if name in table.by_model or name in table.slots:
        return True
    prefix, slash, rest = name.partition("/")
    slot = table.slots.get(prefix) if slash else None
    return slot is not None and rest in slot.models


def known_name(table: RoutingTable, name: str | None) -> str | None:
    """``name`` as hal0web knows it: as given when known; else without its ``:latest`` tag
    (``gemma3:latest`` -> ``gemma3``) or with it (``gemma3`` -> ``gemma3:latest``, what an
    Ollama server lists), when that is known. Unknown either way: as given (its 404)."""
    if not name or _known(table, name):
        return name
    other = name.removesuffix(_TAG) if name.endswith(_TAG) else name + _TAG
    return other if _known(table, other) else name


# --- what the listings say, in Ollama's words ---------------------------------------------


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _params(count: int) -> str:
    """A parameter count as Ollama shows it: 1.2B, 270M."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}".removesuffix(".0") + unit
    return str(count)


def _meta(fields: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = fields.get("meta")
    return meta if isinstance(meta, dict) else {}


def _text(*values: object) -> str:
    return next((v for v in values if isinstance(v, str) and v), "")


def _int(*values: object) -> int | None:
    return next((v for v in values if type(v) is int and v > 0), None)


def details(model_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's ``details`` from what the slot's listing said of the model."""
    meta = _meta(fields)
    family = _text(fields.get("family"), fields.get("architecture"), meta.get("architecture"))
    n_params = _int(meta.get("n_params"), fields.get("parameter_count"))
    quant = _text(fields.get("quantization_level"), fields.get("quantization"))
    if not quant:
        named = _QUANT.search(model_id) or _QUANT.search(_text(fields.get("checkpoint")))
        quant = named.group(1).upper() if named else ""
    return {
        "parent_model": "",
        "format": _text(fields.get("format")),
        "family": family,
        "families": [family] if family else None,
        "parameter_size": _text(fields.get("parameter_size"))
        or (_params(n_params) if n_params else ""),
        "quantization_level": quant,
    }


def context_length(fields: Mapping[str, Any]) -> int | None:
    """The model's context length as its listing says it (llama.cpp's n_ctx_train is the
    model's own, as Ollama's ``<arch>.context_length``; vLLM's max_model_len)."""
    meta = _meta(fields)
    return _int(meta.get("n_ctx_train"), fields.get("context_length"), fields.get("max_model_len"))


def _modified(fields: Mapping[str, Any]) -> str:
    created = fields.get("created")
    if type(created) is int and created > 0:
        seconds = created / 1000 if created > 10**11 else created  # some list milliseconds
        return _iso(datetime.fromtimestamp(seconds, UTC))
    return _iso(datetime.fromtimestamp(0, UTC))


def _size(fields: Mapping[str, Any]) -> int:
    return _int(_meta(fields).get("size"), fields.get("size")) or 0


def _fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("id", "object", "status", "hal0")}


# --- which slots, which models --------------------------------------------------------------


def _slots(table: RoutingTable, entry: Mapping[str, Any]) -> list[SlotEntry]:
    """The slots a /v1/models entry says serve it, best first."""
    hal0 = entry.get("hal0") or {}
    names = [s["name"] for s in hal0.get("slots", ())] or [hal0.get("slot")]
    return [table.slots[n] for n in names if n in table.slots]


def _serves(slot: SlotEntry, endpoint: str) -> bool:
    return adapters.serves(endpoint, slot.endpoints)


def _ollama_entries(table: RoutingTable, everything: bool, scope: Scope) -> list[dict[str, Any]]:
    """The /v1/models entries Ollama's API reaches (chat, generate or embed), with their
    slots."""
    found = []
    for entry in models_list.listed(table, everything, scope):
        slots = _slots(table, entry)
        if any(_serves(s, e) for s in slots for e in (CHAT, GENERATE, EMBED)):
            found.append({**entry, "slots": slots})
    return found


def _listed(model_id: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": model_id,
        "model": model_id,
        "modified_at": _modified(fields),
        "size": _size(fields),
        # Not a file's digest (hal0web has no file): a stable one of the name, which clients
        # use to tell models apart.
        "digest": hashlib.sha256(model_id.encode()).hexdigest(),
        "details": details(model_id, fields),
    }


def _json(data: Any, status: int = 200) -> HttpResponse:
    return HttpResponse(orjson.dumps(data), status=status, content_type="application/json")


async def _caller_scope(request: HttpRequest) -> Scope:
    return (await authorize(request, _KEY_HEADER)).scope


async def tags(request: HttpRequest) -> HttpResponse:
    try:
        scope = await _caller_scope(request)
    except ApiError as err:
        return fail(request, err, protocol=OLLAMA)
    table = await store.ensure_loaded()
    models = [
        _listed(e["id"], _fields(e))
        for e in _ollama_entries(table, models_list.list_all(request), scope)
    ]
    return _json({"models": models})


def _expires(slot: SlotEntry, upstream_model: str, last_used: float, pinned: bool) -> str:
    """When hal0web would unload the model for idleness: its slot's ``unload_idle_s`` after
    its last use (busy now: after now); never when the slot does not, or it is pinned, or
    never used (the loader unloads only what was used)."""
    if not (slot.loads_models and slot.unload_idle_s) or pinned:
        return _iso(_NEVER)
    inflight, used_here = (loads.usage().get(slot.name, {}).get(upstream_model) or [0, 0.0])[:2]
    used = time.time() if inflight else max(last_used, used_here)
    if not used:
        return _iso(_NEVER)
    return _iso(datetime.fromtimestamp(used + slot.unload_idle_s, UTC))


async def ps(request: HttpRequest) -> HttpResponse:
    try:
        scope = await _caller_scope(request)
    except ApiError as err:
        return fail(request, err, protocol=OLLAMA)
    table = await store.ensure_loaded()
    running = []
    for entry in _ollama_entries(table, False, scope):
        loaded = [s for s in entry["slots"] if s.models[entry["id"]].load in states.SERVABLE]
        if not loaded:
            continue
        slot, model = loaded[0], loaded[0].models[entry["id"]]
        fields = _fields(entry)
        item = _listed(entry["id"], fields)
        item["expires_at"] = _expires(slot, model.upstream_model, model.last_used, model.pinned)
        item["size_vram"] = 0  # not told by any slot's listing
        length = context_length(fields)
        if length:
            item["context_length"] = length
        running.append(item)
    return _json({"models": running})


async def version(request: HttpRequest) -> HttpResponse:
    return _json({"version": VERSION})


def capabilities(slots: Iterable[SlotEntry], fields: Mapping[str, Any]) -> list[str]:
    """What the model can do: what its slots serve (chat: completion and tools, hal0web
    passing tools on; embeddings), and what its listing says (vision, thinking)."""
    found: list[str] = []
    for slot in slots:
        if _serves(slot, CHAT):
            found += ["completion", "tools"]
        elif _serves(slot, GENERATE):
            found.append("completion")
        if _serves(slot, EMBED):
            found.append("embedding")
    listed = fields.get("capabilities")
    labels = fields.get("labels")  # Lemonade's
    for said in [
        *(listed if isinstance(listed, list) else ()),
        *(labels if isinstance(labels, list) else ()),
    ]:
        if isinstance(said, str) and said.lower() in _CAPABILITIES:
            found.append(_CAPABILITIES[said.lower()])
    return list(dict.fromkeys(found))


def _shown(entry: Mapping[str, Any]) -> dict[str, Any]:
    fields = _fields(entry)
    info_details = details(entry["id"], fields)
    info: dict[str, Any] = {}
    length = context_length(fields)
    # Clients read `<general.architecture>.context_length`: where the family is not known,
    # the architecture says so and the length is still found.
    arch = info_details["family"] or (_NO_ARCH if length else "")
    if arch:
        info["general.architecture"] = arch
    n_params = _int(_meta(fields).get("n_params"))
    if n_params:
        info["general.parameter_count"] = n_params
    if length:
        info[f"{arch}.context_length"] = length
    return {
        "license": "",
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": info_details,
        "model_info": info,
        "capabilities": capabilities(entry["slots"], fields),
        "modified_at": _modified(fields),
    }


async def show(request: HttpRequest) -> HttpResponse:
    try:
        scope = await _caller_scope(request)
        try:
            data = bodies.parse(request.body).data
        except RequestDataTooBig:
            raise ApiError(413, "request_too_large", "The request body is too large.") from None
        name = data.get("model") or data.get("name")  # `name`: the older clients'
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model_required", "model is required", param="model")
    except ApiError as err:
        return fail(request, err, protocol=OLLAMA)
    table = await store.ensure_loaded()
    wanted = known_name(table, name)
    for entry in _ollama_entries(table, True, scope):
        if entry["id"] == wanted:
            return _json(_shown(entry))
    missing = ApiError(404, "model_not_found", f"model '{name}' not found", param="model")
    return fail(request, missing, protocol=OLLAMA)
