"""No secret is ever shown (issue 14): credentials in a slot's URL reach the upstream and
nothing else — not a client's error, the live feed, a log line, /healthz or the admin list.

One real server process, its log file read as an operator would.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import websockets

from dispatch.lib import redact
from tests.fakes import free_port
from tests.processes import Hal0Process, manage, server_env

PASSWORD = "s3cret-pw"


def test_masked_keeps_everything_but_the_userinfo():
    assert redact.masked("http://u:pw@host:8001/v1") == "http://***@host:8001/v1"
    assert redact.masked("https://token@h/v1") == "https://***@h/v1"
    assert (
        redact.masked("slot 'a' at http://u:p@h/v1 is unreachable; see HTTPS://x:y@z")
        == "slot 'a' at http://***@h/v1 is unreachable; see HTTPS://***@z"
    )
    assert redact.masked("mail me at ann@example.org") == "mail me at ann@example.org"
    assert redact.masked("http://h/v1?q=a@b") == "http://h/v1?q=a@b"


def _superuser_cookie(env: dict[str, str]) -> str:
    code = (
        "from django.contrib.auth import get_user_model; from django.test import Client; "
        "u = get_user_model().objects.create_superuser('root', password='x-not-used-x'); "
        "c = Client(); c.force_login(u); print(c.cookies['sessionid'].value)"
    )
    return "sessionid=" + manage(env, "shell", "-c", code).strip().splitlines()[-1]


async def _snapshot(server: Hal0Process, cookie: str) -> str:
    ws_url = f"ws://127.0.0.1:{server.port}/ws/dispatch/"
    headers = {"Cookie": cookie, "Origin": server.url}
    async with websockets.connect(ws_url, additional_headers=headers) as ws:
        async with asyncio.timeout(10):
            return str(await ws.recv())


def test_a_slot_url_password_is_shown_nowhere(tmp_path: Path):
    env = server_env(tmp_path, HAL0_PROBE_INTERVAL_S="0.5")
    manage(env, "migrate", "-v0")
    dead = free_port()  # nothing listens: every request and probe fails, and says where to
    manage(
        env,
        "shell",
        "-c",
        "from dispatch.models import Slot, SlotModel; "
        f"s = Slot.objects.create(name='locked', url='http://hal0:{PASSWORD}@127.0.0.1:{dead}/v1'); "
        "SlotModel.objects.create(slot=s, model_id='m1', is_default=True)",
    )
    cookie = _superuser_cookie(env)
    server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
    try:
        shown: list[str] = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            r = client.post("/v1/chat/completions", json={"model": "m1", "messages": []})
            assert r.status_code in (502, 503), r.text
            shown.append(r.text)
            r = client.post(
                "/v1/chat/completions", json={"model": "m1", "stream": True, "messages": []}
            )
            shown.append(r.text)
            shown.append(client.get("/healthz").text)
            admin = client.get("/admin/dispatch/slot/", headers={"Cookie": cookie})
            assert admin.status_code == 200 and "locked" in admin.text
            shown.append(admin.text)
        snapshot = asyncio.run(_snapshot(server, cookie))
        assert f"http://***@127.0.0.1:{dead}/v1" in snapshot
        shown.append(snapshot)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "slot locked is offline" in log  # the watcher did say where it failed
    shown.append(log)
    for text in shown:
        assert PASSWORD not in text, text[:2000]
    assert json.loads(snapshot)["type"] == "snapshot"
