"""CORS on /v1 (issue 13 item 10): named origins only, preflights answered, Allow correct."""

from __future__ import annotations

import httpx
import pytest

ORIGIN = "https://app.example"


@pytest.fixture
def client(seed_slots, settings, hal0):
    settings.HAL0_CORS_ORIGINS = frozenset({ORIGIN})
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


def preflight(c: httpx.Client, path: str, origin: str = ORIGIN, method: str = "POST"):
    return c.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/v1/chat/completions", "OPTIONS, POST"),
        ("/v1/completions", "OPTIONS, POST"),
        ("/v1/embeddings", "OPTIONS, POST"),
        ("/v1/models", "GET, HEAD, OPTIONS"),
        ("/v1/models/hermes", "GET, HEAD, OPTIONS"),
    ],
)
def test_a_preflight_from_a_named_origin_is_answered(client, path, allow):
    r = preflight(client, path, method="POST" if "models" not in path else "GET")
    assert r.status_code == 204, r.text
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert r.headers["Access-Control-Allow-Methods"] == allow
    assert (
        r.headers["Access-Control-Allow-Headers"] == "authorization, content-type, x-stainless-os"
    )
    assert int(r.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in r.headers["Vary"]
    assert r.headers["Allow"] == allow
    assert "Access-Control-Allow-Credentials" not in r.headers  # keys, not cookies


def test_a_preflight_from_another_origin_gets_no_cors_headers(client):
    r = preflight(client, "/v1/chat/completions", origin="https://evil.example")
    assert r.status_code == 204
    assert "Access-Control-Allow-Origin" not in r.headers
    assert r.headers["Allow"] == "OPTIONS, POST"


def test_no_origin_is_allowed_by_default(seed_slots, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        r = preflight(c, "/v1/chat/completions")
    assert r.status_code == 204 and "Access-Control-Allow-Origin" not in r.headers


def test_the_actual_request_carries_the_origin_and_exposes_our_headers(client):
    r = client.post(
        "/v1/chat/completions",
        json={"model": "hermes", "messages": []},
        headers={"Origin": ORIGIN},
    )
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip().lower() for h in r.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"x-request-id", "x-hal0-slot", "x-hal0-resolution", "retry-after"} <= exposed
    # Errors too: a browser can read why it was refused.
    r = client.post("/v1/chat/completions", json={"model": "nope"}, headers={"Origin": ORIGIN})
    assert r.status_code == 404 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    r = client.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_a_stream_carries_the_origin(client):
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "hermes", "stream": True, "messages": []},
        headers={"Origin": ORIGIN},
    ) as r:
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        r.read()


def test_a_request_from_another_origin_is_refused_without_cors_headers(client):
    # Refused outright (issue 14), not only unreadable: a blind POST would still run.
    r = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    assert "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", "OPTIONS, POST"),
        ("PUT", "/v1/embeddings", "OPTIONS, POST"),
        ("POST", "/v1/models", "GET, HEAD, OPTIONS"),
        ("DELETE", "/v1/models/hermes", "GET, HEAD, OPTIONS"),
    ],
)
def test_405_lists_what_the_path_serves(client, method, path, allow):
    r = client.request(method, path)
    assert r.status_code == 405
    assert r.headers["Allow"] == allow
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_head_on_models_is_served(client):
    r = client.head("/v1/models")
    assert r.status_code == 200 and r.content == b""
