"""The endpoint table is the one source: URLs, Allow, the 404 text, the error shape, the
type -> endpoints defaults and the manifest names all follow from it."""

from __future__ import annotations

import httpx
import pytest
from django.urls import resolve as resolve_url

from dispatch.models import SlotType
from dispatch.routing import endpoints
from dispatch.routing.endpoints import BY_NAME, DEFAULT_ENDPOINTS, ENDPOINTS, OFFERABLE, SLOT_TYPES
from dispatch.routing.resolver import NoRoute, pinned, resolve
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot
from tests.polling import decision_lines, wait_until


def test_every_path_of_the_table_is_routed_to_its_view():
    from dispatch.api import views as api

    for ep in ENDPOINTS:
        for path in ep.paths:
            concrete = "/" + path.replace("<str:response_id>", "resp_1").replace(
                "<path:model_id>", "a/b"
            )
            assert resolve_url(concrete).func is api.VIEWS[ep.name], concrete


def test_the_defaults_follow_the_slot_type():
    assert DEFAULT_ENDPOINTS["llm"] == {"chat/completions", "completions", "responses", "messages"}
    assert DEFAULT_ENDPOINTS["embedding"] == {"embeddings"}
    assert DEFAULT_ENDPOINTS["reranking"] == {"rerank"}
    assert DEFAULT_ENDPOINTS["transcription"] == {"audio/transcriptions", "audio/translations"}
    assert DEFAULT_ENDPOINTS["tts"] == {"audio/speech"}
    assert DEFAULT_ENDPOINTS["image"] == {
        "images/generations",
        "images/edits",
        "images/variations",
    }
    # The model's choices are the table's types (hal0's slot types).
    assert set(SlotType.values) == set(SLOT_TYPES)
    assert OFFERABLE == (
        "chat/completions",
        "completions",
        "responses",
        "messages",
        "embeddings",
        "rerank",
        "audio/transcriptions",
        "audio/translations",
        "audio/speech",
        "images/generations",
        "images/edits",
        "images/variations",
        # Ollama's own API: a manifest may say its server speaks it; no type's default.
        "api/chat",
        "api/generate",
        "api/embed",
        "api/embeddings",
    )


def test_derived_facts():
    assert BY_NAME["responses/{id}"].allow == "DELETE, GET, OPTIONS"
    assert BY_NAME["messages"].key_header == "x-api-key"
    assert BY_NAME["chat/completions"].key_header is None
    assert BY_NAME["messages/count_tokens"].offer == "messages"
    ollama = ("chat", "generate", "embed", "embeddings", "tags", "ps", "version", "show")
    root = endpoints.ROOT_PATHS
    assert root == {"/rerank", *(f"/api/{p}" for p in ollama)}
    assert endpoints.upstream_path("/api/chat") == "/api/chat"  # from the server's root
    assert endpoints.upstream_path("/v1/responses/r 1/input_items", "limit=2") == (
        "responses/r%201/input_items?limit=2"
    )
    assert endpoints.upstream_path("/rerank") == "rerank"
    for ep in ENDPOINTS:
        assert ep.label in endpoints.SERVED_TEXT


@pytest.fixture
def client(fleet, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


def test_unknown_paths_list_every_endpoint_and_allow_comes_from_the_table(client):
    r = client.post("/v1/nope", json={})
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    for label in ("/v1/responses", "/v1/messages", "/rerank", "/v1/audio/speech"):
        assert label in message
    r = client.options("/v1/responses/resp_x")
    assert r.status_code == 204 and r.headers["allow"] == "DELETE, GET, OPTIONS"
    r = client.put("/v1/responses/resp_x")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, OPTIONS"
    # On an Anthropic path, hal0web's own errors are Anthropic's shape.
    r = client.get("/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_decisions_and_headers_are_the_same_on_every_endpoint(client, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hal0.dispatch"):
        r = client.post("/v1/rerank", json={"model": "rerank-a", "query": "q", "documents": []})
        assert r.headers["x-hal0-slot"] == "rr-a" and r.headers["x-hal0-resolution"]
        assert r.headers["x-request-id"]
        lines = decision_lines(caplog)
    assert lines[-1]["endpoint"] == "rerank" and lines[-1]["slot"] == "rr-a"
    assert lines[-1]["why"]["text"].startswith("answered by rr-a")


# --- the resolver: pure, endpoint-aware ----------------------------------------------------


def _table() -> RoutingTable:
    return RoutingTable.build(
        1,
        [
            make_slot("chat", "http://x/v1", [ModelEntry("m", "m", "manifest", True)]),
            make_slot(
                "emb",
                "http://y/v1",
                [ModelEntry("m", "m", "manifest", True), ModelEntry("e", "e", "manifest")],
                type="embedding",
            ),
            make_slot(
                "both",
                "http://z/v1",
                [ModelEntry("z", "z", "manifest", True)],
                endpoints=frozenset({"chat/completions", "embeddings"}),
                is_default=True,
            ),
        ],
    )


def test_resolve_keeps_only_slots_offering_the_endpoint():
    table = _table()
    assert resolve(table, "m", "chat/completions").slot == "chat"
    assert resolve(table, "m", "embeddings").slot == "emb"
    miss = resolve(table, "e", "chat/completions")
    assert isinstance(miss, NoRoute) and miss.code == "endpoint_not_supported"
    assert "slot 'emb' speaks embeddings" in miss.message
    miss = resolve(table, "emb/e", "rerank")
    assert isinstance(miss, NoRoute) and miss.code == "endpoint_not_supported"
    miss = resolve(table, "emb", "chat/completions")  # a slot's name
    assert isinstance(miss, NoRoute) and miss.code == "endpoint_not_supported"
    assert resolve(table, "z", "embeddings").slot == "both"
    # No model: the default slot of a type that offers the endpoint, if it offers it.
    assert resolve(table, None, "chat/completions").slot == "both"
    miss = resolve(table, None, "rerank")
    assert isinstance(miss, NoRoute) and miss.code == "model_required"
    # The operator's fallback takes only what it can serve.
    assert resolve(table, "x", "chat/completions", fallback_slot="chat").slot == "chat"
    miss = resolve(table, "x", "rerank", fallback_slot="chat")
    assert isinstance(miss, NoRoute) and miss.code == "model_not_found"


def test_pinned_sends_a_response_to_its_slot_whatever_the_model():
    table = _table()
    decision = pinned(table, "chat", "z", "chat/completions", "resp_1")
    assert decision.slot == "chat" and decision.resolution_path == "affinity:chat"
    assert decision.upstream_model is None  # `z` is not the slot's: sent as it is
    assert pinned(table, "chat", "m", "chat/completions", "r").upstream_model == "m"
    gone = pinned(table, "deleted", None, "responses", "resp_1")
    assert isinstance(gone, NoRoute) and gone.code == "response_not_found"
    assert gone.status == 404


def test_models_keep_the_upstreams_own_fields(client, settings):
    from dispatch.models import StateVersion

    def beta():
        data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        entry = data.get("beta")
        return entry if entry and "context_length" in entry else None

    entry = wait_until(beta, "model beta listed with its upstream's fields")
    assert entry["context_length"] == 4096
    assert entry["capabilities"] == ["completion"]
    assert entry["meta"] == {"n_ctx_train": 4096, "server": "llm-b"}
    assert entry["owned_by"] == "llamacpp" and entry["created"] > 0  # the upstream's own
    assert entry["object"] == "model" and entry["hal0"]["slots"][0]["name"] == "llm-b"
    detail = client.get("/v1/models/llm-b/beta").json()
    assert detail["context_length"] == 4096 and detail["hal0"]["slot"] == "llm-b"
    # An alias shows its model's fields.
    alias = wait_until(lambda: client.get("/v1/models/al").json().get("meta"), "alias al's meta")
    assert alias["server"] == "llm-a"
    # The upstream's `created` moves with every probe (llama.cpp's does): not a change.
    wait_until(
        lambda: set(client.get("/healthz").json()["slots"].values()) == {"ready"}, "all ready"
    )
    import time

    before = StateVersion.current()
    time.sleep(4 * settings.HAL0_PROBE_INTERVAL_S)
    assert StateVersion.current() == before
