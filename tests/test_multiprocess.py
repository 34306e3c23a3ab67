"""hal0web as several real processes on Redis (and PostgreSQL): what each process holds must
converge on one truth (issue 12)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env, session_cookie


@pytest.fixture
def processes() -> Iterator[list[Hal0Process]]:
    started: list[Hal0Process] = []
    yield started
    for proc in started:
        proc.stop()


async def _next_event(ws: websockets.ClientConnection, kind: str, timeout: float) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            if event.get("type") == kind:
                return event


@pytest.mark.redis
async def test_an_idle_websocket_stays_open_under_redis(
    tmp_path: Path, processes: list[Hal0Process]
) -> None:
    """redis-py 8 reads with a 5 s socket timeout by default, the same 5 s channels-redis
    blocks for in BZPOPMIN: an idle page's socket then died every 5-9 s (close 1006)."""
    env = server_env(tmp_path, REDIS_URL=redis_url_or_skip(), HAL0_WATCHER="false")
    manage(env, "migrate", "-v0")
    cookie = session_cookie(env)
    server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
    processes.append(server)
    ws_url = f"ws://127.0.0.1:{server.port}/ws/dispatch/"
    headers = {"Cookie": cookie, "Origin": server.url}
    async with websockets.connect(ws_url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "snapshot"
        await asyncio.sleep(12)  # idle across two of channels-redis' blocking reads
        async with httpx.AsyncClient(base_url=server.url) as client:
            r = await client.post("/v1/chat/completions", json={"model": "nobody-serves-this"})
        assert r.status_code == 404
        event = await _next_event(ws, "dispatch.decision", 10)
        assert event["model"] == "nobody-serves-this"
        assert ws.close_code is None
    assert "TimeoutError" not in server.log(), server.log()
