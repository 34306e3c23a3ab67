"""The seed scenario over real sockets: two fake servers as `primary` and `agent-hermes`."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

from tests.polling import decision_lines

HERMES_MODEL = "qwen3-coder-reap-25b-a3b-q5km"


@pytest.fixture
def client(seed_slots, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


def chat(client: httpx.Client, model: str | None, **extra) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    if model is not None:
        body["model"] = model
    return client.post("/v1/chat/completions", json=body)


def test_hermes_model_lands_on_agent_hermes_and_primary_on_primary(client, fake_pair):
    r = chat(client, HERMES_MODEL)
    assert r.status_code == 200
    assert r.json()["slot"] == "agent-hermes"  # the fake upstream's own tag
    assert r.headers["X-Hal0-Slot"] == "agent-hermes"
    assert r.headers["X-Hal0-Resolution"] == "model:agent-hermes"
    r = chat(client, "qwen3-coder-40b")
    assert r.json()["slot"] == "primary"
    assert r.headers["X-Hal0-Slot"] == "primary"
    hermes, primary = fake_pair["agent-hermes"][0], fake_pair["primary"][0]
    assert [s.json["model"] for s in hermes.requests if s.path == "/v1/chat/completions"] == [
        HERMES_MODEL
    ]
    assert [s.json["model"] for s in primary.requests if s.path == "/v1/chat/completions"] == [
        "qwen3-coder-40b"
    ]


def test_streaming_lands_on_the_right_slot_and_passes_sse_through(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": HERMES_MODEL,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["X-Accel-Buffering"] == "no"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Hal0-Slot"] == "agent-hermes"
        text = r.read().decode()
    events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 3 and {c["slot"] for c in chunks} == {"agent-hermes"}


def test_qualified_id_pins_and_rewrites_model(client, fake_pair):
    r = chat(client, f"agent-hermes/{HERMES_MODEL}")
    assert r.status_code == 200
    assert r.headers["X-Hal0-Resolution"] == "qualified:agent-hermes"
    sent = fake_pair["agent-hermes"][0].requests[-1]
    assert sent.json["model"] == HERMES_MODEL  # the upstream sees its own id, not ours


def test_alias_is_rewritten_and_the_rest_of_the_body_is_byte_identical(client, fake_pair):
    raw = b'{"messages": [{"role":"user","content":"caf\\u00e9 \xf0\x9f\x99\x82"}],  "model" : "hermes", "temperature": 0.70}'
    r = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200
    assert r.headers["X-Hal0-Resolution"] == "alias:agent-hermes"
    sent = fake_pair["agent-hermes"][0].requests[-1].body
    assert sent == raw.replace(b'"hermes"', f'"{HERMES_MODEL}"'.encode())


def test_slot_name_alone_uses_its_default_model(client, fake_pair):
    r = chat(client, "agent-hermes")
    assert r.headers["X-Hal0-Resolution"] == "slot:agent-hermes"
    assert fake_pair["agent-hermes"][0].requests[-1].json["model"] == HERMES_MODEL


def test_no_model_goes_to_the_default_slot_and_says_so(client, fake_pair):
    r = chat(client, None)
    assert r.status_code == 200
    assert r.headers["X-Hal0-Resolution"] == "default:primary"
    assert fake_pair["primary"][0].requests[-1].json["model"] == "qwen3-coder-40b"


def test_unknown_model_is_404_with_suggestions(client, fake_pair):
    r = chat(client, "qwen3-coder-reap")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert HERMES_MODEL in err["message"]
    assert r.headers["X-Request-Id"]
    # Nothing was sent anywhere.
    for fake, _ in fake_pair.values():
        assert not [s for s in fake.requests if s.path == "/v1/chat/completions"]


def test_request_id_is_echoed_or_generated(client):
    ids = {chat(client, HERMES_MODEL, stream=False).headers["X-Request-Id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    r = client.post(
        "/v1/chat/completions",
        json={"model": HERMES_MODEL, "messages": []},
        headers={"X-Request-Id": "abc-123"},
    )
    assert r.headers["X-Request-Id"] == "abc-123"


def test_client_authorization_never_reaches_upstream_and_slot_key_does(
    seed_slots, hal0, fake_pair, monkeypatch
):
    monkeypatch.setenv("HERMES_TEST_KEY", "sk-upstream")
    seed_slots["agent-hermes"].api_key_env = "HERMES_TEST_KEY"
    seed_slots["agent-hermes"].save()
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        c.post(
            "/v1/chat/completions",
            json={"model": HERMES_MODEL, "messages": []},
            headers={"Authorization": "Bearer sk-client", "Cookie": "sessionid=x"},
        )
        c.post(
            "/v1/chat/completions",
            json={"model": "qwen3-coder-40b", "messages": []},
            headers={"Authorization": "Bearer sk-client"},
        )
    hermes_seen = fake_pair["agent-hermes"][0].requests[-1].headers
    assert hermes_seen["authorization"] == "Bearer sk-upstream"
    assert "cookie" not in hermes_seen
    assert "authorization" not in fake_pair["primary"][0].requests[-1].headers


def test_models_lists_each_model_once_and_the_rest_on_request(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    ids = [m["id"] for m in data["data"]]
    # Once each, bare: no alias, no slot/model id (a client's dropdown shows each model once).
    assert sorted(ids) == sorted([HERMES_MODEL, "qwen3-coder-40b"])
    bare = {m["id"]: m for m in data["data"]}[HERMES_MODEL]
    assert bare["owned_by"] == "agent-hermes"
    state = bare["hal0"]["slots"][0]["state"]
    # Its kind's endpoints until the watcher has asked the server, the server's after.
    found = bare["hal0"]["slots"][0]["endpoints_from"]
    assert found in ("kind", "server")
    assert bare["hal0"]["slots"] == [
        {
            "name": "agent-hermes",
            "state": state,
            "source": "manifest",
            "endpoints": ["chat/completions", "completions", "messages", "responses"],
            # The fake speaks them all (compaction is Responses' own); Ollama's API is
            # served translated.
            "serves": {
                **dict.fromkeys(
                    ["chat/completions", "completions", "responses", "messages"], "native"
                ),
                "responses/compact": "native",
                "api/chat": "translated",
                "api/generate": "translated",
            },
            "endpoints_from": found,
            # A plain OpenAI-compatible server: what it lists is loaded.
            "load": "loaded",
            "progress": None,
            "load_error": None,
            "pinned": False,
            "would_unload": None,
        }
    ]
    assert bare["status"] == {"value": "loaded"}
    every = client.get("/v1/models?all=true").json()["data"]
    by_id = {m["id"]: m for m in every}
    pinned = by_id[f"agent-hermes/{HERMES_MODEL}"]
    assert pinned["hal0"]["slot"] == "agent-hermes" and pinned["owned_by"] == "agent-hermes"
    assert by_id["hermes"]["hal0"]["slots"][0]["source"] == "alias"
    assert len(every) == len(by_id) == 2 + 1 + 3  # bare, the alias, each slot/model pair
    assert (
        client.get(f"/v1/models/agent-hermes/{HERMES_MODEL}").json()["id"]
        == f"agent-hermes/{HERMES_MODEL}"
    )
    assert client.get("/v1/models/hermes").json()["id"] == "hermes"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_every_listed_model_id_routes(client, settings):
    for query in ("", "?all=true"):
        for entry in client.get("/v1/models" + query).json()["data"]:
            r = chat(client, entry["id"])
            assert r.status_code == 200, (entry["id"], r.text)


def test_the_setting_lists_everything_without_asking(client, settings):
    settings.HAL0_MODELS_LIST_ALL = True
    ids = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {"hermes", f"agent-hermes/{HERMES_MODEL}"} <= ids
    ids = {m["id"] for m in client.get("/v1/models?all=false").json()["data"]}
    assert ids == {HERMES_MODEL, "qwen3-coder-40b"}


def test_embeddings_go_only_to_a_slot_that_offers_them(client, fake_pair, seed_slots):
    # An llm slot does not offer embeddings by default: a clear 404, nothing forwarded.
    r = client.post("/v1/embeddings", json={"model": "hermes", "input": "x"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "endpoint_not_supported"
    assert "agent-hermes" in err["message"] and "chat/completions" in err["message"]
    assert not [s for s in fake_pair["agent-hermes"][0].requests if s.path == "/v1/embeddings"]
    # Listed in its manifest (`endpoints = [...]`), it does.
    slot = seed_slots["agent-hermes"]
    slot.endpoints = ["chat/completions", "embeddings"]
    slot.save()
    r = client.post("/v1/embeddings", json={"model": "hermes", "input": "x"})
    assert r.status_code == 200 and r.json()["slot"] == "agent-hermes"


def test_official_openai_sdk_unchanged(seed_slots, hal0):
    sdk = openai.OpenAI(base_url=hal0.url + "/v1", api_key="unused", max_retries=0)
    raw = sdk.chat.completions.with_raw_response.create(
        model=HERMES_MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-hal0-slot"] == "agent-hermes"
    assert raw.parse().choices[0].message.content == "hello from agent-hermes"
    stream = sdk.chat.completions.create(
        model="qwen3-coder-40b", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    pieces = [c.choices[0].delta.content for c in stream]
    assert pieces[0] == "hello from primary" and len(pieces) == 3
    ids = {m.id for m in sdk.models.list()}
    assert ids == {HERMES_MODEL, "qwen3-coder-40b"}
    ids = {m.id for m in sdk.models.list(extra_query={"all": "true"})}
    assert {HERMES_MODEL, "qwen3-coder-40b", f"agent-hermes/{HERMES_MODEL}", "hermes"} <= ids
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.code == "model_not_found"
    sdk.close()


def test_every_request_logs_one_structured_decision(client, caplog):
    with caplog.at_level(logging.INFO, logger="hal0.dispatch"):
        chat(client, HERMES_MODEL)
        chat(client, "nope")
        lines = decision_lines(caplog, 2)
    assert len(lines) == 2
    ok, missing = lines
    assert ok["event"] == "dispatch.decision"
    assert {
        k: ok[k]
        for k in ("model", "slot", "upstream_model", "resolution_path", "status", "cache_state")
    } == {
        "model": HERMES_MODEL,
        "slot": "agent-hermes",
        "upstream_model": HERMES_MODEL,
        "resolution_path": "model:agent-hermes",
        "status": 200,
        "cache_state": "fresh",
    }
    assert ok["latency_us"] > 0 and ok["duration_ms"] > 0 and ok["request_id"]
    assert (
        missing["status"] == 404
        and missing["slot"] is None
        and missing["error"] == "model_not_found"
    )
