"""The one fake upstream (tests/fakes.py) answers every endpoint hal0web forwards, each tagged
with its name, and its switches hold on all of them."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.fakes import FakeUpstream, ServerThread

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def served() -> Iterator[tuple[FakeUpstream, httpx.Client]]:
    fake = FakeUpstream("a", models=["m1"])
    server = ServerThread(fake).start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield fake, client
    server.stop()


def test_one_fake_serves_chat_responses_messages_and_rerank(served) -> None:
    fake, client = served
    chat = client.post("/v1/chat/completions", json=CHAT)
    assert chat.json()["choices"][0]["message"]["content"] == "hello from a"
    made = client.post("/v1/responses", json={"model": "m1", "input": "hi"}).json()
    assert made["id"].startswith("resp_a_") and made["id"] in fake.responses
    assert client.get(f"/v1/responses/{made['id']}").json() == made
    said = client.post("/v1/messages", json={**CHAT, "max_tokens": 8})
    assert said.json()["content"] == [{"type": "text", "text": "hello from a"}]
    ranked = client.post("/v1/rerank", json={"model": "m1", "query": "q", "documents": ["x"]})
    assert ranked.json()["slot"] == "a"
    for answer in (chat, said, ranked):
        assert answer.headers["x-upstream-slot"] == "a"
    assert [s.path for s in fake.calls()] == [
        "/v1/chat/completions",
        "/v1/responses",
        f"/v1/responses/{made['id']}",
        "/v1/messages",
        "/v1/rerank",
    ]
    assert client.post("/v1/nothing").status_code == 404


def test_the_listing_is_openais_or_llama_cpps(served) -> None:
    fake, client = served
    assert client.get("/v1/models").json()["data"] == [
        {"id": "m1", "object": "model", "owned_by": "a"}
    ]
    fake.listing = "llama.cpp"
    [model] = client.get("/v1/models").json()["data"]
    assert model["owned_by"] == "llamacpp" and model["meta"]["server"] == "a"
    assert model["context_length"] == 4096 and model["created"] > 0


def test_health_and_failure_switches_hold_for_every_endpoint(served) -> None:
    fake, client = served
    fake.health = "loading"
    assert client.get("/health").status_code == 503
    assert client.get("/v1/models").status_code == 503
    fake.health, fake.fail_status = "ready", 529
    assert client.get("/v1/models").status_code == 200  # a probe is not a request to fail
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        r = client.post(path, json=CHAT)
        assert r.status_code == 529 and r.json() == {"error": {"message": "a says no"}}
