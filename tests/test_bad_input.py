"""Bad input gets a clear OpenAI-shaped error with the right status; nothing reaches a slot."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture
def client(seed_slots, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]
    assert err["param"] == param
    assert r.headers["X-Request-Id"]


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"model": "x",}', b"\xff\xfe"])
def test_non_json_body_is_400_invalid_json(client, body):
    r = client.post(
        "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_json")


@pytest.mark.parametrize("body", [b"[]", b"42", b'"model"', b"null"])
def test_json_that_is_not_an_object_is_400(client, body):
    assert_error(client.post("/v1/chat/completions", content=body), 400, "invalid_request_error")


@pytest.mark.parametrize("model", [42, ["a"], {"id": "x"}, True])
def test_model_not_a_string_is_400_invalid_model(client, model):
    r = client.post("/v1/chat/completions", json={"model": model, "messages": []})
    assert_error(r, 400, "invalid_model", "model")


def test_stream_not_a_boolean_is_400(client):
    r = client.post("/v1/chat/completions", json={"model": "hermes", "stream": "yes"})
    assert_error(r, 400, "invalid_request_error", "stream")


def test_body_over_the_limit_is_413(seed_slots, hal0, settings, fake_pair):
    settings.HAL0_MAX_BODY_MB = 1
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024
    big = (
        b'{"model": "hermes", "messages": [{"role": "user", "content": "'
        + b"x" * (1024 * 1024 + 10)
        + b'"}]}'
    )
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        assert_error(c.post("/v1/chat/completions", content=big), 413, "request_too_large")

        # Without a Content-Length (chunked upload) the limit still holds.
        def chunks():
            yield big[:1000]
            yield big[1000:]

        assert_error(c.post("/v1/chat/completions", content=chunks()), 413, "request_too_large")
    assert not [s for s in fake_pair["agent-hermes"][0].requests if s.path.startswith("/v1/chat")]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_is_405(client, method):
    r = client.request(method, "/v1/chat/completions")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "OPTIONS, POST"
    r = client.post("/v1/models", json={})
    assert_error(r, 405, "method_not_allowed")


def test_unknown_v1_endpoint_is_an_openai_shaped_404(client):
    assert_error(client.post("/v1/nope", json={}), 404, "not_found")


def test_no_default_slot_and_no_model_is_400_model_required(client):
    r = client.post("/v1/embeddings", json={"input": "x"})
    assert_error(r, 400, "model_required", "model")


def test_the_openai_sdk_parses_our_errors(seed_slots, hal0):
    sdk = openai.OpenAI(base_url=hal0.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.chat.completions.create(model=42, messages=[])
    assert exc.value.code == "invalid_model"
    sdk.close()


# --- issue 13: what the upstream would accept is accepted -------------------------------------


def test_a_lone_surrogate_reaches_the_upstream_untouched(client, fake_pair):
    # What JavaScript's JSON.stringify writes for a string cut mid-emoji; JSON allows it.
    raw = b'{"model": "hermes", "messages": [{"role": "user", "content": "cut \\ud83d"}]}'
    r = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    (seen,) = [s for s in fake_pair["agent-hermes"][0].requests if s.path.startswith("/v1/chat")]
    assert seen.body == raw.replace(b'"hermes"', b'"qwen3-coder-reap-25b-a3b-q5km"')


def test_a_lone_surrogate_in_an_unknown_model_is_an_openai_shaped_404(client):
    raw = b'{"model": "nope\\udc00", "messages": []}'
    r = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert_error(r, 404, "model_not_found", "model")
    assert "nope\udc00" in r.json()["error"]["message"]  # the escape, decoded


def test_stream_null_is_treated_as_absent(client):
    r = client.post(
        "/v1/chat/completions", json={"model": "hermes", "stream": None, "messages": []}
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
