"""Anthropic Messages through hal0web, driven by the official `anthropic` SDK: routed by
model, streamed event by event, hal0web's key accepted as `x-api-key`, errors in
Anthropic's shape."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from dispatch.models import ApiKey

HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture
def claude(fleet, hal0):
    # The SDK appends /v1/messages to its base URL, as Claude Code does.
    client = anthropic.Anthropic(base_url=hal0.url, api_key="unused", max_retries=0)
    yield client
    client.close()


def test_create_lands_on_the_slot_serving_the_model(claude, fleet):
    raw = claude.messages.with_raw_response.create(model="beta", max_tokens=16, messages=HI)
    assert raw.headers["x-hal0-slot"] == "llm-b"
    assert raw.headers["x-hal0-resolution"] == "model:llm-b"
    message = raw.parse()
    assert message.content[0].text == "hello from llm-b"
    assert fleet["llm-b"].seen("/v1/messages")[-1].json["model"] == "beta"
    message = claude.messages.create(model="al", max_tokens=16, messages=HI)
    assert message.content[0].text == "hello from llm-a"
    assert fleet["llm-a"].seen("/v1/messages")[-1].json["model"] == "alpha"  # alias rewritten


def test_stream_passes_every_event_through(claude, fleet, hal0):
    with claude.messages.stream(model="alpha", max_tokens=16, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "hello from llm-a"
    assert final.stop_reason == "end_turn"
    # Byte for byte: the event names and order as the upstream sent them.
    body = {"model": "alpha", "max_tokens": 16, "messages": HI, "stream": True}
    with httpx.stream("POST", hal0.url + "/v1/messages", json=body, timeout=10) as r:
        assert r.headers["x-hal0-slot"] == "llm-a"
        seen = r.read()
    events = [block.split(b"\n")[0] for block in seen.split(b"\n\n") if block]
    assert events == [
        b"event: message_start",
        b"event: content_block_start",
        b"event: ping",
        b"event: content_block_delta",
        b"event: content_block_delta",
        b"event: content_block_stop",
        b"event: message_delta",
        b"event: message_stop",
    ]


def test_count_tokens_routes_by_model(claude, fleet):
    raw = claude.messages.with_raw_response.count_tokens(model="beta", messages=HI)
    assert raw.headers["x-hal0-slot"] == "llm-b"
    assert raw.parse().input_tokens == 2
    assert fleet["llm-b"].seen("/v1/messages/count_tokens")


def test_an_unknown_model_is_an_anthropic_not_found_error(claude, fleet, hal0):
    with pytest.raises(anthropic.NotFoundError) as exc:
        claude.messages.create(model="nope", max_tokens=16, messages=HI)
    assert exc.value.status_code == 404
    r = httpx.post(hal0.url + "/v1/messages", json={"model": "nope", "messages": HI}, timeout=10)
    body = r.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "nope" in body["error"]["message"]
    assert r.headers["x-hal0-error"] == "1"
    # A model whose slots have no Messages endpoint: the same shape.
    r = httpx.post(hal0.url + "/v1/messages", json={"model": "voice-a", "messages": HI}, timeout=10)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "endpoint_not_supported"
    assert r.json()["error"]["type"] == "not_found_error"


def test_hal0_key_is_accepted_as_x_api_key_and_never_forwarded(fleet, hal0):
    _, key = ApiKey.issue("claude-code")
    good = anthropic.Anthropic(base_url=hal0.url, api_key=key, max_retries=0)
    assert good.messages.create(model="beta", max_tokens=8, messages=HI).content
    sent = fleet["llm-b"].seen("/v1/messages")[-1].headers
    assert "x-api-key" not in sent and "authorization" not in sent
    good.close()
    bad = anthropic.Anthropic(base_url=hal0.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as exc:
        bad.messages.create(model="beta", max_tokens=8, messages=HI)
    assert exc.value.body["error"]["type"] == "authentication_error"
    bad.close()
    # Only the Messages paths take it there: an OpenAI path still wants a Bearer key.
    r = httpx.post(
        hal0.url + "/v1/chat/completions",
        json={"model": "beta", "messages": HI},
        headers={"x-api-key": key},
        timeout=10,
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
