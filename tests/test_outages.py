"""Redis or PostgreSQL away under real worker processes (issue 24, point 1): every /v1 request
answers in its protocol (served from what is at hand, else 503 with Retry-After and a code
naming what is missing), no response id is disowned, the pages say "live updates paused",
the log says so once when the outage starts and once when it ends, and everything recovers
by itself within 5 s of the service's return.

The Redis here is the test's own (``tests.own_redis.OwnRedis``) and PostgreSQL is reached
through a proxy the test can cut (``tests.cut_proxy.CutProxy``): the shared ones are
never stopped.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.browser import browser  # noqa: F401 - the fixture
from tests.cut_proxy import CutProxy
from tests.fakes import FakeUpstream, ServerThread
from tests.live import events_of
from tests.own_redis import OwnRedis
from tests.polling import wait_until
from tests.processes import Hal0Process, manage, server_env, session_cookie

LIVE_PAUSED = 4503  # dispatch.web.consumers.LIVE_PAUSED, as the page reads it
BACK_WITHIN_S = 5.0  # everything recovers by itself within this of the service's return
OUTAGE_S = 4.0  # the shortest outage the tests make


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    yield server
    server.stop()


@pytest.fixture
def fakes() -> Iterator[dict[str, ServerThread]]:
    servers = {
        "one": ServerThread(FakeUpstream("one", models=["model-one"], listing="llama.cpp")),
        "two": ServerThread(FakeUpstream("two", models=["model-two"], listing="llama.cpp")),
        # Speaks only chat: its Responses are translated and kept by hal0web (the database).
        "chat": ServerThread(
            FakeUpstream("chat", models=["model-chat"], missing={"/v1/responses", "/v1/messages"})
        ),
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


def _manifests(tmp_path: Path, fakes: dict[str, ServerThread]) -> Path:
    folder = tmp_path / "slots"
    folder.mkdir()
    extra = {
        # A limited slot: its places are taken in Redis (the max_concurrency gate).
        "one": "[limits]\nmax_concurrency = 4\n",
        "chat": 'type = "llm"\nendpoints = ["chat/completions"]\n',
    }
    for name, server in fakes.items():
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\nurl = "{server.url}/v1"\n{extra.get(name, "")}'
            f'[model]\ndefault = "model-{name}"\n'
        )
    return folder


def _workers(
    tmp_path: Path,
    env: dict[str, str],
    processes: list[Hal0Process],
    fakes: dict[str, ServerThread],
) -> tuple[Hal0Process, Hal0Process]:
    manage(env, "migrate", "-v0")
    manage(env, "slots", "import", str(_manifests(tmp_path, fakes)))
    one, two = (Hal0Process(env, tmp_path / f"worker-{i}.log").wait_ready() for i in (1, 2))
    processes.extend([one, two])

    def all_ready() -> bool:
        want = {name: "ready" for name in fakes}
        return all(
            httpx.get(w.url + "/healthz", timeout=5).json()["slots"] == want for w in (one, two)
        )

    wait_until(all_ready, "every slot ready on both workers", 15)
    return one, two


def _create(worker: Hal0Process, model: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        worker.url + "/v1/responses", json={"model": model, "input": "hi", **extra}, timeout=30
    )


def _get(worker: Hal0Process, rid: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{worker.url}/v1/responses/{rid}", headers=headers, timeout=30)


def _chat(worker: Hal0Process, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(worker.url + "/v1/chat/completions", json=body, timeout=30)


def _unavailable(r: httpx.Response, code: str) -> None:
    """503 in OpenAI's shape, naming what is missing, with a Retry-After."""
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/json"), r.text
    assert r.json()["error"]["code"] == code, r.text
    assert int(r.headers["retry-after"]) >= 1


def _found(worker: Hal0Process, rid: str, resolution: str) -> bool:
    r = _get(worker, rid)
    return r.status_code == 200 and r.headers.get("x-hal0-resolution") == resolution


def _ws(worker: Hal0Process, cookie: str) -> Any:
    return websockets.connect(
        f"ws://127.0.0.1:{worker.port}/ws/dispatch/",
        additional_headers={"Cookie": cookie, "Origin": worker.url},
    )


async def _closed_with(ws: Any, timeout: float) -> int | None:
    """The close code the server ends ``ws`` with (reading, and dropping, what comes)."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                await ws.recv()
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None


async def _paused_page(worker: Hal0Process, cookie: str) -> tuple[dict[str, Any], int | None]:
    """A page connecting while the bus is away: its snapshot, then the close code."""
    async with _ws(worker, cookie) as ws:
        first = json.loads(await ws.recv())
        return first, await _closed_with(ws, 5)


async def _live_page_hears(worker: Hal0Process, cookie: str, other: Hal0Process) -> bool:
    """A page on ``worker`` connects live and hears a decision ``other`` makes (the bus
    between processes works again)."""
    async with _ws(worker, cookie) as ws:
        first = json.loads(await ws.recv())
        if first.get("type") != "snapshot" or first.get("paused"):
            return False
        model = f"heard-{time.monotonic_ns()}"
        async with httpx.AsyncClient() as client:
            await client.post(other.url + "/v1/chat/completions", json={"model": model})
        try:
            async with asyncio.timeout(2):
                while True:
                    for event in events_of(json.loads(await ws.recv())):
                        if event.get("type") == "dispatch.decision" and event.get("model") == model:
                            return True
        except (TimeoutError, websockets.ConnectionClosed):
            return False


def _problems(worker: Hal0Process) -> list[str]:
    """Every log line that is a warning, an error or a traceback."""
    lines = worker.log().splitlines()
    return [
        line
        for line in lines
        if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback|Exception in ASGI", line)
    ]


def _said_once(worker: Hal0Process, service: str) -> None:
    """The outage in the log: one warning as it began, one as it ended, nothing else."""
    problems = _problems(worker)
    away = [p for p in problems if f"hal0.outages {service} is away" in p]
    back = [p for p in problems if f"hal0.outages {service} is back" in p]
    assert len(away) == 1 and len(back) == 1 and len(problems) == 2, "\n".join(problems)


def _within(check: Any, what: str, since: float) -> float:
    """Wait for ``check`` until BACK_WITHIN_S after ``since``; the seconds it took."""
    wait_until(check, what, max(0.1, since + BACK_WITHIN_S - time.monotonic()), 0.1)
    return time.monotonic() - since


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("fault", ["stopped", "frozen"])
def test_redis_away_every_request_answers_in_its_protocol_and_no_id_is_disowned(
    tmp_path: Path,
    fakes: dict[str, ServerThread],
    pg_url: str,
    own_redis: OwnRedis,
    processes: list[Hal0Process],  # last: its workers stop before Redis and the database go
    fault: str,
) -> None:
    env = server_env(
        tmp_path, DATABASE_URL=pg_url, REDIS_URL=own_redis.url, HAL0_PROBE_INTERVAL_S="1"
    )
    one, two = _workers(tmp_path, env, processes, fakes)
    cookie = session_cookie(env, staff=True)
    made = _create(one, "model-two").json()["id"]  # recorded in Redis only

    async def open_page_across_the_stop() -> tuple[dict[str, Any], int | None]:
        async with _ws(two, cookie) as ws:
            first = json.loads(await ws.recv())
            own_redis.stop()
            return first, await _closed_with(ws, 10)

    away_since = time.monotonic()
    if fault == "stopped":
        # An open page is closed with the code the page reads as "paused", not cut (1011).
        first, code = asyncio.run(open_page_across_the_stop())
        assert first["type"] == "snapshot" and not first.get("paused")
        assert code == LIVE_PAUSED
    else:
        own_redis.freeze()  # the first call to notice waits out its socket timeout (5 s)

    # Worker two never saw `made`, and Redis alone held it: it cannot tell, and says so.
    _unavailable(_get(two, made), "affinity_unavailable")
    _unavailable(_create(two, "model-one", previous_response_id=made), "affinity_unavailable")
    assert _found(one, made, "affinity:two")  # its maker remembers it

    # A response made now: its id goes to the database too, so every worker finds it.
    during = _create(one, "model-one")
    assert during.status_code == 200, during.text
    during_id = during.json()["id"]
    assert _found(two, during_id, "affinity:one")
    # Routing needs nothing of Redis: the table is in memory; the gate lets through. Each
    # request is a decision event the bus cannot carry: dropped, not a traceback each.
    for i in range(40):
        assert _chat((one, two)[i % 2], ("model-one", "model-two")[i // 2 % 2]).status_code == 200
    # A page connecting now gets the table, flagged paused, and the close code: no 500.
    first, code = asyncio.run(_paused_page(two, cookie))
    assert first["type"] == "snapshot" and first["paused"] is True
    assert {s["name"] for s in first["slots"]} == set(fakes)
    assert code == LIVE_PAUSED

    # Away for a few of its probes at least (a stopped Redis is noticed at once).
    time.sleep(max(0.0, away_since + OUTAGE_S - time.monotonic()))
    if fault == "stopped":
        own_redis.start()  # empty: it kept nothing
    else:
        own_redis.thaw()
    back = time.monotonic()
    redis = own_redis.client()

    def recorded() -> bool:
        # The outage's id, and the one the restarted Redis lost, are written to it again.
        return all(redis.get(f"hal0:response:{rid}") is not None for rid in (made, during_id))

    took = _within(recorded, "the ids written to Redis again", back)
    took = max(took, _within(lambda: _found(two, made, "affinity:two"), "made found", back))
    took = max(
        took,
        _within(lambda: asyncio.run(_live_page_hears(two, cookie, one)), "a live page", back),
    )
    redis.close()
    for worker in (one, two):
        _said_once(worker, "Redis")
    print(f"recovered {took:.1f} s after Redis's return ({fault})")


@pytest.mark.postgres
@pytest.mark.redis
def test_after_redis_returns_the_leader_hears_a_standby_again(
    tmp_path: Path,
    fakes: dict[str, ServerThread],
    pg_url: str,
    own_redis: OwnRedis,
    processes: list[Hal0Process],
) -> None:
    """The processes' own listeners (the leader's ear for pokes, every version check's) wait
    for Redis and join again: they died with the first failed read before."""
    # Probes every 30 s: only a poke over Redis explains a probe within a second or two.
    env = server_env(
        tmp_path, DATABASE_URL=pg_url, REDIS_URL=own_redis.url, HAL0_PROBE_INTERVAL_S="30"
    )
    manage(env, "migrate", "-v0")
    manage(env, "slots", "import", str(_manifests(tmp_path, fakes)))
    workers = [Hal0Process(env, tmp_path / f"worker-{i}.log").wait_ready() for i in (1, 2)]
    processes.extend(workers)

    def leaders() -> list[Hal0Process]:
        return [w for w in workers if "leads the watcher" in w.log()]

    wait_until(lambda: len(leaders()) == 1, "one leader", 10)
    [standby] = [w for w in workers if w not in leaders()]

    def state_of_one() -> str:
        return str(httpx.get(standby.url + "/healthz", timeout=5).json()["slots"]["one"])

    wait_until(lambda: state_of_one() == "ready", "one ready", 10)
    own_redis.stop()
    for worker in workers:  # requests, whose decisions the bus cannot carry now
        assert _chat(worker, "model-two").status_code == 200
    wait_until(lambda: all("Redis is away" in w.log() for w in workers), "the outage seen", 10)
    time.sleep(2)  # a few of the probes' tries fail
    own_redis.start()
    wait_until(lambda: all("Redis is back" in w.log() for w in workers), "its return seen", 5)
    time.sleep(1)  # the listeners join again at once; a second's margin for a loaded machine
    fakes["one"].stop()  # one's server goes away between two probes
    assert _chat(standby, "model-one").status_code in (502, 503)
    wait_until(lambda: state_of_one() == "offline", "the leader probed one (poked)", 2)
    for worker in workers:
        _said_once(worker, "Redis")


@pytest.mark.browser
@pytest.mark.postgres
@pytest.mark.redis
def test_a_page_says_live_updates_paused_while_redis_is_away_and_recovers(
    tmp_path: Path,
    fakes: dict[str, ServerThread],
    pg_url: str,
    own_redis: OwnRedis,
    processes: list[Hal0Process],
    browser: Any,  # noqa: F811 - the fixture
) -> None:
    env = server_env(
        tmp_path, DATABASE_URL=pg_url, REDIS_URL=own_redis.url, HAL0_PROBE_INTERVAL_S="1"
    )
    one, _ = _workers(tmp_path, env, processes, fakes)
    cookie = session_cookie(env, staff=True)
    from playwright.sync_api import expect

    context = browser.new_context()
    try:
        name, value = cookie.split("=", 1)
        context.add_cookies([{"name": name, "value": value, "url": one.url}])
        chat, activity = context.new_page(), context.new_page()
        chat.goto(one.url + "/")
        activity.goto(one.url + "/activity/")
        for page in (chat, activity):
            expect(page.locator("#live")).to_have_attribute("data-live", "live")
        own_redis.stop()
        for page in (chat, activity):
            badge = page.locator("#live")
            expect(badge).to_have_attribute("data-live", "paused", timeout=10_000)
            expect(badge).to_contain_text("live updates paused")
        # Reloaded meanwhile, the chat page still has its slots (the table is in memory).
        chat.reload()
        expect(chat.locator("#live")).to_contain_text("live updates paused")
        expect(chat.locator("#slots")).to_contain_text("chat")
        own_redis.start()
        for page in (chat, activity):
            expect(page.locator("#live")).to_have_attribute(
                "data-live", "live", timeout=BACK_WITHIN_S * 1000
            )
    finally:
        context.close()
    assert not [p for p in _problems(one) if "Traceback" in p or "ASGI" in p]


@pytest.mark.postgres
def test_postgresql_away_affinity_and_kept_responses_answer_json_and_are_written_after(
    tmp_path: Path,
    fakes: dict[str, ServerThread],
    pg_url: str,
    proxy: CutProxy,
    processes: list[Hal0Process],
) -> None:
    """The database store for affinity (no Redis), the responses hal0web keeps, and the
    page's session on /v1 — each answers JSON while PostgreSQL is away."""
    env = server_env(tmp_path, DATABASE_URL=proxy.url(pg_url), HAL0_PROBE_INTERVAL_S="1")
    one, two = _workers(tmp_path, env, processes, fakes)
    cookie = session_cookie(env)
    key = manage(
        env,
        "shell",
        "-c",
        "from dispatch.models import ApiKey; row, key = ApiKey.issue('ci'); print(key)",
    ).split()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    wait_until(lambda: _chat(two, "model-one").status_code == 401, "keys required", 5)

    def create(worker: Hal0Process, model: str) -> str:
        r = httpx.post(
            worker.url + "/v1/responses",
            json={"model": model, "input": "hi"},
            headers=auth,
            timeout=30,
        )
        assert r.status_code == 200, r.text
        return str(r.json()["id"])

    made, kept = create(one, "model-two"), create(one, "model-chat")
    proxy.cut()

    _unavailable(_get(two, made, auth), "affinity_unavailable")
    _unavailable(_get(two, kept, auth), "store_unavailable")
    assert _get(one, made, auth).status_code == 200  # its maker remembers it
    during, during_kept = create(one, "model-one"), create(one, "model-chat")
    # The kept one waits in its maker's memory, which answers for it meanwhile.
    assert _get(one, during_kept, auth).json()["id"] == during_kept
    _unavailable(_get(two, during, auth), "affinity_unavailable")
    _unavailable(_get(two, during_kept, auth), "store_unavailable")
    # A key is in memory; the page's session is in the database.
    chat = httpx.post(
        two.url + "/v1/chat/completions",
        json={"model": "model-one", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth,
        timeout=30,
    )
    assert chat.status_code == 200, chat.text
    _unavailable(
        httpx.post(
            two.url + "/v1/chat/completions",
            json={"model": "model-one"},
            headers={"Cookie": cookie},
            timeout=30,
        ),
        "session_unavailable",
    )

    async def page() -> int | None:
        # The page's session is in the database too: paused like a Redis outage, never a
        # 500 to the handshake.
        async with _ws(two, cookie) as ws:
            return await _closed_with(ws, 10)

    # In a thread of its own: a browser test earlier in the file leaves this one's loop running.
    with ThreadPoolExecutor(1) as thread:
        assert thread.submit(asyncio.run, page()).result() == LIVE_PAUSED

    proxy.restore()
    back = time.monotonic()
    found = _within(lambda: _get(two, during, auth).status_code == 200, "the outage's id", back)
    found = max(
        found,
        _within(lambda: _get(two, during_kept, auth).status_code == 200, "the kept one", back),
    )
    print(f"written and found {found:.1f} s after PostgreSQL's return")
    for worker in (one, two):
        log = worker.log()
        assert "Internal Server Error" not in log and "Exception in ASGI" not in log, log
        assert log.count("hal0.outages the database is away") <= 1, log
