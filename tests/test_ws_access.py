"""Who may open the live feed, and what each user hears on it (issue 14): a real hal0web under
Uvicorn, real WebSocket clients (the websockets library) and real HTTP requests."""

from __future__ import annotations

import json
import socket
import time
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from django.test import Client
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.live import events_of
from tests.polling import wait_until

WS_PATH = "/ws/dispatch/"


def login_cookie(username: str, staff: bool = False) -> str:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user(
        username, password="not-a-real-password", is_staff=staff
    )
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def open_feed(
    port: int,
    cookie: str,
    origin: str | None,
    host: str = "127.0.0.1",
    extra: dict[str, str] | None = None,
) -> ClientConnection:
    """A WebSocket to the server on ``port``, saying ``Host: host:port`` (the TCP connection
    goes to 127.0.0.1 whatever the name)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    headers = {"Cookie": cookie, **(extra or {})}
    return connect(
        f"ws://{host}:{port}{WS_PATH}",
        sock=sock,
        origin=origin,  # type: ignore[arg-type]
        additional_headers=headers,
        open_timeout=5,
    )


def refused(port: int, cookie: str, origin: str | None, **kw: Any) -> bool:
    try:
        with open_feed(port, cookie, origin, **kw) as ws:
            ws.recv(timeout=5)
    except InvalidStatus as exc:
        assert exc.response.status_code == 403
        return True
    return False


@pytest.fixture
def staff_cookie(transactional_db: None) -> str:
    return login_cookie("op", staff=True)


# --- A: the Origin must be the server's own (scheme, host and port) or a trusted one ---------


def test_only_the_servers_own_origin_opens_the_feed(hal0, staff_cookie, settings):
    port = hal0.port
    own = f"http://127.0.0.1:{port}"
    with open_feed(port, staff_cookie, own) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
    # Same host, so the browser sends the Lax session cookie along: another port's page...
    assert refused(port, staff_cookie, "http://127.0.0.1:9999")
    # ...the same port over another scheme, another host name of the same machine...
    assert refused(port, staff_cookie, f"https://127.0.0.1:{port}")
    assert refused(port, staff_cookie, f"http://localhost:{port}")
    # ...a port that is not one, an opaque origin (sandboxed frames), and none at all.
    assert refused(port, staff_cookie, "http://127.0.0.1:notaport")
    assert refused(port, staff_cookie, "null")
    assert refused(port, staff_cookie, None)
    # The Host must be one we serve: a rebound name is not its own origin (DNS rebinding).
    assert refused(port, staff_cookie, f"http://evil.example:{port}", host="evil.example")
    # A name in ALLOWED_HOSTS is its own origin under that name.
    with open_feed(port, staff_cookie, f"http://localhost:{port}", host="localhost") as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"


def test_csrf_trusted_origins_may_open_the_feed(hal0, staff_cookie, settings):
    settings.CSRF_TRUSTED_ORIGINS = ["http://127.0.0.1:9999", "https://*.example.test"]
    with open_feed(hal0.port, staff_cookie, "http://127.0.0.1:9999") as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
    with open_feed(hal0.port, staff_cookie, "https://ui.example.test") as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
    assert refused(hal0.port, staff_cookie, "http://ui.example.test")  # the scheme counts
    assert refused(hal0.port, staff_cookie, "http://127.0.0.1:9998")


def test_behind_a_tls_proxy_the_own_origin_is_https(hal0, staff_cookie, settings):
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    port = hal0.port
    proxied = {"X-Forwarded-Proto": "https"}
    with open_feed(port, staff_cookie, f"https://127.0.0.1:{port}", extra=proxied) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
    assert refused(port, staff_cookie, f"http://127.0.0.1:{port}", extra=proxied)
    # Without the proxy's header the socket is plain ws: its own origin is http again.
    assert refused(port, staff_cookie, f"https://127.0.0.1:{port}")


# --- B: staff hear everything; every other user their own requests, and no slot URLs --------


def _drain(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """Every event that arrives within ``seconds``."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            seen.extend(events_of(json.loads(ws.recv(timeout=left))))
        except TimeoutError:
            break
    return seen


def _page_request(base: str, cookie: str | None) -> str:
    """A chat request as the page sends it (session cookie + CSRF token); its request id."""
    headers: dict[str, str] = {}
    if cookie:
        page = httpx.get(base + "/", headers={"Cookie": cookie})
        assert page.status_code == 200
        token = page.cookies["csrftoken"]
        headers = {"Cookie": f"{cookie}; csrftoken={token}", "X-CSRFToken": token}
    r = httpx.post(
        base + "/v1/chat/completions",
        json={"model": "hermes", "messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-request-id"]


@pytest.mark.parametrize("api_auth", ["auto", "required"])
def test_each_user_hears_only_their_own_decisions_and_no_slot_urls(
    seed_slots, hal0, staff_cookie, settings, api_auth
):
    settings.HAL0_API_AUTH = api_auth
    ann, bob = login_cookie("ann"), login_cookie("bob@example.test")  # '@': not a group name
    own = hal0.url
    with ExitStack() as stack:
        feeds = {
            name: stack.enter_context(open_feed(hal0.port, c, own))
            for name, c in [("op", staff_cookie), ("ann", ann), ("bob", bob)]
        }
        snaps = {name: json.loads(ws.recv(timeout=5)) for name, ws in feeds.items()}
        assert all(s["type"] == "snapshot" for s in snaps.values())
        assert all("url" in s for s in snaps["op"]["slots"])
        for name in ("ann", "bob"):
            assert snaps[name]["slots"] and all("url" not in s for s in snaps[name]["slots"])
            assert hal0.url not in json.dumps(snaps[name])

        ids = {"ann": _page_request(own, ann), "bob": _page_request(own, bob)}
        if api_auth == "auto":  # open: anyone may ask, and their requests are nobody's
            ids["anyone"] = _page_request(own, None)
        heard = {name: _drain(ws, 1.5) for name, ws in feeds.items()}

        def decisions(name: str) -> set[str]:
            return {e["request_id"] for e in heard[name] if e["type"] == "dispatch.decision"}

        assert decisions("op") == set(ids.values())
        assert decisions("ann") == {ids["ann"]}
        assert decisions("bob") == {ids["bob"]}

        # A table change: staff see the slot's URL, the others the same event without it.
        from dispatch.models import Slot

        hermes = Slot.objects.get(name="agent-hermes")
        hermes.device = "gpu-2"
        hermes.save()
        changed = {name: _drain(ws, 1.0) for name, ws in feeds.items()}
        for name, events in changed.items():
            about = [e for e in events if e["type"].startswith("slot.") and "slot" in e]
            about = [e for e in about if isinstance(e["slot"], dict)]
            assert [e["slot"]["device"] for e in about] == ["gpu-2"], (name, events)
            assert ("url" in about[0]["slot"]) is (name == "op"), name


def test_a_probe_error_does_not_name_the_slots_host_to_non_staff(
    seed_slots, fake_pair, hal0, staff_cookie
):
    ann = login_cookie("ann")
    with (
        open_feed(hal0.port, staff_cookie, hal0.url) as op,
        open_feed(hal0.port, ann, hal0.url) as theirs,
    ):
        for ws in (op, theirs):
            assert json.loads(ws.recv(timeout=5))["type"] == "snapshot"
        fake_pair["primary"][1].stop()  # the watcher's next probe finds nobody there

        def offline(ws: ClientConnection) -> dict[str, Any]:
            def next_offline() -> dict[str, Any] | None:
                for event in events_of(json.loads(ws.recv(timeout=10))):
                    slot = event.get("slot")
                    if isinstance(slot, dict) and slot["name"] == "primary" and slot["last_error"]:
                        return slot
                return None

            found = wait_until(next_offline, "primary to go offline", 10, every=0)
            assert found is not None
            return found

        staff_view, their_view = offline(op), offline(theirs)
    assert "127.0.0.1" in staff_view["last_error"], staff_view
    assert "127.0.0.1" not in their_view["last_error"], their_view
    assert "(the slot's host)" in their_view["last_error"]


def test_the_activity_page_is_staffs_alone(seed_slots, hal0, staff_cookie):
    ann = login_cookie("ann")
    r = httpx.get(hal0.url + "/activity/", headers={"Cookie": ann})
    assert r.status_code == 302 and "/admin/login/" in r.headers["location"]
    assert httpx.get(hal0.url + "/activity/", headers={"Cookie": staff_cookie}).status_code == 200
