"""Hardening from the environment (issue 14): nosniff on every answer (/v1's lean handler
included), the Content-Security-Policy on every page, and HAL0_HTTPS's HSTS and Secure
cookies — checked on real servers' answers."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.processes import Hal0Process, create_user, manage, server_env

PASSWORD = "correct-horse-battery"


def _csp(r: httpx.Response) -> dict[str, str]:
    policy = r.headers["content-security-policy"]
    return {d.split(" ", 1)[0]: d.partition(" ")[2] for d in policy.split("; ")}


@pytest.fixture
def live(seed_slots, hal0, admin_user):
    return hal0


# A static file is among the answers: WhiteNoise hands Django a sync file iterator, and Django
# under ASGI warns once per file it serves so (harmless: read in a thread; see BROWSER_MARKS).
@pytest.mark.filterwarnings(
    "ignore:StreamingHttpResponse must consume synchronous iterators:Warning"
)
def test_every_answer_says_nosniff(live):
    base = live.url
    chat = {"model": "hermes", "messages": [{"role": "user", "content": "hi"}]}
    answers = {
        "v1 models": httpx.get(base + "/v1/models"),
        "v1 chat": httpx.post(base + "/v1/chat/completions", json=chat),
        "v1 stream": httpx.post(base + "/v1/chat/completions", json={**chat, "stream": True}),
        "v1 no model": httpx.post(base + "/v1/chat/completions", json={**chat, "model": "x"}),
        "v1 bad json": httpx.post(base + "/v1/chat/completions", content=b"{"),
        "v1 unknown path": httpx.get(base + "/v1/nothing-here"),
        "v1 wrong method": httpx.delete(base + "/v1/models"),
        "v1 options": httpx.options(base + "/v1/models"),
        "healthz": httpx.get(base + "/healthz"),
        "metrics": httpx.get(base + "/metrics"),
        "page": httpx.get(base + "/"),
        "login": httpx.get(base + "/accounts/login/"),
        "admin": httpx.get(base + "/admin/login/"),
        "static": httpx.get(base + "/static/dispatch/app.js"),
        "404": httpx.get(base + "/no-such-page"),
    }
    statuses = {name: r.status_code for name, r in answers.items()}
    assert statuses["v1 chat"] == 200 and statuses["v1 stream"] == 200
    assert statuses["v1 no model"] == 404 and statuses["v1 unknown path"] == 404
    assert statuses["v1 bad json"] == 400 and statuses["v1 wrong method"] == 405
    assert statuses["404"] == 404 and statuses["static"] == 200
    missing = {
        name: r.status_code
        for name, r in answers.items()
        if r.headers.get("x-content-type-options") != "nosniff"
    }
    assert missing == {}


def test_pages_carry_a_policy_without_inline_scripts(live, admin_client):
    base = live.url
    for path in ("/accounts/login/", "/admin/login/"):
        policy = _csp(httpx.get(base + path))
        assert policy["script-src"] == "'self'", path
        assert policy["style-src"] == "'self'", path
        assert policy["default-src"] == "'self'" and policy["object-src"] == "'none'"
        assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
        assert "unsafe" not in httpx.get(base + path).headers["content-security-policy"]
    # The logged-in pages (admin_client: the full middleware stack) too, and their markup
    # holds no inline script the policy would block (a JSON data block is no script).
    for path in ("/", "/activity/", "/admin/", "/admin/dispatch/slot/"):
        r = admin_client.get(path)
        assert r.status_code == 200, path
        assert "script-src 'self';" in r["Content-Security-Policy"] + ";", path
        html = r.content.decode()
        for tag in re.findall(r"<script\b[^>]*>", html):
            assert "src=" in tag or 'type="application/json"' in tag, (path, tag)
        assert not re.search(r"\son[a-z]+=", html), path  # no inline event handlers


def test_by_default_no_hsts_and_no_secure_cookies(live):
    r = httpx.get(live.url + "/accounts/login/", headers={"X-Forwarded-Proto": "https"})
    assert "strict-transport-security" not in r.headers
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("csrftoken=") and "secure" not in cookie.lower()


@pytest.fixture
def https_server(tmp_path: Path):
    env = server_env(tmp_path, HAL0_HTTPS="true", HAL0_WATCHER="false")
    manage(env, "migrate", "-v0")
    create_user(env, "ann", PASSWORD)
    server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
    yield server
    server.stop()


def test_hal0_https_sends_hsts_and_secure_cookies(https_server):
    base = https_server.url
    origin = base.replace("http://", "https://")
    proxied = {"X-Forwarded-Proto": "https"}  # what the TLS proxy in front says
    with httpx.Client(base_url=base, headers=proxied) as client:
        form = client.get("/accounts/login/")
        assert form.status_code == 200
        hsts = form.headers["strict-transport-security"]
        assert hsts == "max-age=31536000"  # a year; subdomains are not ours to promise
        assert re.search(r"csrftoken=[^;]+;.*\bSecure\b", form.headers["set-cookie"], re.I)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        assert token
        # Behind the proxy the request is HTTPS: Django's CSRF check wants the https Origin.
        r = client.post(
            "/accounts/login/",
            data={"username": "ann", "password": PASSWORD, "csrfmiddlewaretoken": token[1]},
            # httpx keeps a Secure cookie for https:// only; the browser's side of the proxy is.
            headers={"Origin": origin, "Cookie": f"csrftoken={form.cookies['csrftoken']}"},
        )
        assert r.status_code == 302, r.text
        assert re.search(r"sessionid=[^;]+;.*\bSecure\b", r.headers["set-cookie"], re.I)
        # No redirect to HTTPS of its own (the proxy owns that), and /v1 still says nosniff.
        plain = httpx.get(base + "/accounts/login/")
        assert plain.status_code == 200 and "strict-transport-security" not in plain.headers
        assert httpx.get(base + "/v1/models").headers["x-content-type-options"] == "nosniff"
