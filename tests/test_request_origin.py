"""Requests only from where they belong (issue 14): /v1 answers its ALLOWED_HOSTS only, a
browser page of another origin may not call it, and no header or body a client sends makes
it fail with a 500.

Through the in-process server on a real loopback socket, with raw header bytes where httpx
would refuse to encode them.
"""

from __future__ import annotations

import re

import httpx
import pytest

BODY = {"model": "hermes", "messages": [{"role": "user", "content": "hi"}]}
CHAT = "/v1/chat/completions"


@pytest.fixture
def client(seed_slots, hal0):
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


def own_origin(client: httpx.Client) -> str:
    return client.base_url.scheme + "://" + client.base_url.netloc.decode()


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


@pytest.mark.parametrize("path", [CHAT, "/v1/models", "/v1/models/hermes", "/v1/nothing-here"])
def test_a_host_outside_allowed_hosts_gets_400(client, path):
    # DNS rebinding: a page on attacker.example resolves its name to 127.0.0.1.
    if path == CHAT:
        r = client.post(path, json=BODY, headers={"Host": "attacker.example"})
    else:
        r = client.get(path, headers={"Host": "attacker.example"})
    assert_error(r, 400, "invalid_host")
    assert "ALLOWED_HOSTS" in r.json()["error"]["message"]
    assert client.post(CHAT, json=BODY).status_code == 200


def test_a_foreign_origin_is_refused_and_the_sdks_are_not(client, fake_pair):
    before = len(fake_pair["agent-hermes"][0].requests)
    # A blind cross-site form post: text/plain needs no preflight, so the browser sends it.
    r = client.post(
        CHAT,
        content=b'{"model": "hermes", "messages": []}',
        headers={"Content-Type": "text/plain", "Origin": "https://evil.example"},
    )
    assert_error(r, 403, "origin_not_allowed")
    # Another port on the same host is another origin (and the same site: Lax cookies go).
    port = client.base_url.port
    r = client.post(CHAT, json=BODY, headers={"Origin": f"http://127.0.0.1:{port + 1}"})
    assert_error(r, 403, "origin_not_allowed")
    assert_error(client.get("/v1/models", headers={"Origin": "null"}), 403, "origin_not_allowed")
    assert len(fake_pair["agent-hermes"][0].requests) == before  # nothing went upstream
    # No Origin (curl, the SDKs) and the page's own origin are fine.
    assert client.post(CHAT, json=BODY).status_code == 200
    assert client.post(CHAT, json=BODY, headers={"Origin": own_origin(client)}).status_code == 200


def test_an_origin_in_hal0_cors_origins_may_call(client, settings):
    settings.HAL0_CORS_ORIGINS = frozenset({"http://tool.localhost:5173"})
    r = client.post(CHAT, json=BODY, headers={"Origin": "http://tool.localhost:5173"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://tool.localhost:5173"


def test_utf8_header_text_goes_upstream_as_sent(client, fake_pair):
    r = client.post(CHAT, json=BODY, headers={b"X-Title": "café ☕".encode()})
    assert r.status_code == 200, r.text
    assert fake_pair["agent-hermes"][0].requests[-1].headers["x-title"] == "café ☕"


@pytest.mark.parametrize("value", [b"caf\xe9", b"\xff\xfe", b"ok\x80"])
def test_header_bytes_that_are_not_text_get_400(client, value):
    r = client.post(CHAT, json=BODY, headers={b"X-Title": value, b"X-Request-Id": value})
    assert_error(r, 400, "invalid_header")
    assert "X-Title" in r.json()["error"]["message"]
    assert r.headers["x-request-id"].isascii()


@pytest.fixture(params=["required", "auto"])
def page(client, django_user_model, settings, request) -> httpx.Client:
    """The client logged in as the page is: session cookie, CSRF header, own Origin; with
    keys required, and with the API open (the page's requests are still named its user's)."""
    settings.HAL0_API_AUTH = request.param
    django_user_model.objects.create_user("alice", password="pw-alice-1")
    form = client.get("/accounts/login/")
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert found is not None
    token = found.group(1)
    r = client.post(
        "/accounts/login/",
        data={"username": "alice", "password": "pw-alice-1", "csrfmiddlewaretoken": token},
    )
    assert r.status_code == 302
    client.headers.update(
        {"X-CSRFToken": client.cookies["csrftoken"], "Origin": own_origin(client)}
    )
    return client


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("application/x-www-form-urlencoded", b"model=hermes&messages=x"),
        (
            "multipart/form-data; boundary=XX",
            b'--XX\r\nContent-Disposition: form-data; name="model"\r\n\r\nhermes\r\n--XX--\r\n',
        ),
        ("multipart/form-data; boundary=XX", b"--XX\r\nnot a part at all"),
        ("multipart/form-data", b"no boundary"),
    ],
)
def test_form_and_multipart_bodies_on_the_page_session_get_4xx(page, content_type, body):
    r = page.post(CHAT, content=body, headers={"Content-Type": content_type})
    assert 400 <= r.status_code < 500, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"]
    # and the session still works for JSON
    assert page.post(CHAT, json=BODY).status_code == 200
