"""/healthz tells "cannot route" from "cannot record" (issue 24).

A database or Redis outage, or a watcher that stopped probing, is the same for every process:
each still routes by the table it holds, so each answers 200 and says in the body what is
degraded. Only a process that routes worse than the others would answers 503: one with no
table, or one whose table lags the state the others route by. Real server processes, a real
PostgreSQL outage (a proxy the test cuts) and a Redis server of the test's own.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dispatch.coordination.sync import STALE_AFTER_S
from tests.cut_proxy import CutProxy
from tests.fakes import FakeUpstream, ServerThread, free_port
from tests.polling import wait_until
from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env

DISABLE_B = (
    "from dispatch.models import Slot; s = Slot.objects.get(name='b'); s.enabled = False; s.save()"
)
REDIS_QUIET = ("--save", "", "--appendonly", "no")  # nothing written to disk
DB_VERSION = "from dispatch.models import StateVersion; print(StateVersion.current())"


@pytest.fixture
def fakes() -> Iterator[dict[str, ServerThread]]:
    servers = {n: ServerThread(FakeUpstream(n, models=[f"model-{n}"])).start() for n in "ab"}
    yield servers
    for server in servers.values():
        server.stop()


def _slots(env: dict[str, str], tmp_path: Path, fakes: dict[str, ServerThread]) -> None:
    folder = tmp_path / "slots"
    folder.mkdir()
    for name, server in fakes.items():
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\nurl = "{server.url}/v1"\nkind = "openai"\n\n'
            f'[model]\ndefault = "model-{name}"\n'
        )
    manage(env, "migrate", "-v0")
    manage(env, "slots", "import", str(folder))


def _health(server: Hal0Process) -> httpx.Response:
    return httpx.get(server.url + "/healthz", timeout=5)


def _body(server: Hal0Process) -> dict[str, Any]:
    body: dict[str, Any] = _health(server).json()
    return body


def _chat(server: Hal0Process, model: str = "model-a") -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=5).status_code


def _all_well(server: Hal0Process) -> bool:
    r = _health(server)
    return r.status_code == 200 and r.json()["impaired"] == []


@pytest.mark.postgres
def test_a_database_outage_is_200_with_record_false_and_routing_goes_on(
    tmp_path: Path,
    pg_url: str,
    proxy: CutProxy,
    fakes: dict[str, ServerThread],
    processes: list[Hal0Process],
) -> None:
    _slots(server_env(tmp_path, DATABASE_URL=pg_url), tmp_path, fakes)
    env = server_env(tmp_path, DATABASE_URL=proxy.url(pg_url), HAL0_PROBE_INTERVAL_S="0.5")
    server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
    processes.append(server)
    wait_until(lambda: _body(server)["slots"] == {"a": "ready", "b": "ready"}, "ready", 10)
    wait_until(lambda: _all_well(server), "nothing impaired", 10, show=lambda: _body(server))
    body = _body(server)
    assert (body["ok"], body["route"], body["record"], body["cannot_route"]) == (
        True,
        True,
        True,
        None,
    )
    assert body["database"]["reachable"] is True and body["database"]["read_at"]
    assert body["redis"] is None  # not configured
    assert body["request_log"] == {"backlog": 0, "lost": 0, "failing_since": None}

    proxy.cut()
    cut_at = time.monotonic()
    assert _chat(server) == 200  # its row waits for the database
    wait_until(
        lambda: {"database", "request_log", "slot_state"} <= set(_body(server)["impaired"]),
        "the outage seen",
        STALE_AFTER_S + 5,
        0.1,
        show=lambda: _body(server),
    )
    # Past the point where every worker used to answer 503 "stale".
    time.sleep(max(0.0, cut_at + STALE_AFTER_S + 0.5 - time.monotonic()))
    r = _health(server)
    body = r.json()
    assert r.status_code == 200, body
    assert (body["ok"], body["route"], body["record"], body["cannot_route"]) == (
        True,
        True,
        False,
        None,
    )
    assert body["database"]["reachable"] is False and body["database"]["unreachable_since"]
    assert body["watcher"]["stale"] is True
    assert body["request_log"]["backlog"] == 1 and body["request_log"]["failing_since"]
    assert body["slots"] == {"a": "ready", "b": "ready"}  # the table it routes by
    assert _chat(server) == 200 and _chat(server, "model-b") == 200

    proxy.restore()
    back_at = time.monotonic()
    wait_until(lambda: _all_well(server), "all well again", 5, 0.1, show=lambda: _body(server))
    print(f"all well {time.monotonic() - back_at:.2f} s after the database came back")
    body = _body(server)
    assert body["record"] is True and body["request_log"] == {
        "backlog": 0,
        "lost": 0,
        "failing_since": None,
    }
    # One warning as the outage began and one as it ended, not a traceback per version
    # check (every 0.25 s) and per leadership tick (every 0.5 s here).
    wait_until(lambda: "the database is back" in server.log(), "the return told", 5)
    log = server.log()
    assert log.count("the database is away") == 1, log
    assert "Traceback" not in log, log
    assert "could not check the state version" not in log, log
    assert "leadership check failed" not in log, log


@pytest.mark.postgres
@pytest.mark.redis
def test_a_process_whose_table_lags_the_others_answers_503(
    tmp_path: Path,
    pg_url: str,
    proxy: CutProxy,
    fakes: dict[str, ServerThread],
    processes: list[Hal0Process],
) -> None:
    """Its database reads fail while another process's do not: once a change is committed
    and announced, the others route by it and this one cannot load it."""
    direct = server_env(
        tmp_path, DATABASE_URL=pg_url, REDIS_URL=redis_url_or_skip(), HAL0_PROBE_INTERVAL_S="0.5"
    )
    _slots(direct, tmp_path, fakes)
    cut = Hal0Process(
        {**direct, "DATABASE_URL": proxy.url(pg_url)}, tmp_path / "cut.log"
    ).wait_ready()
    processes.append(cut)
    other = Hal0Process(direct, tmp_path / "other.log").wait_ready()
    processes.append(other)
    wait_until(
        lambda: _all_well(cut) and _all_well(other), "nothing impaired", 10, show=lambda: _body(cut)
    )

    proxy.cut()
    cut_at = time.monotonic()
    # The outage alone: its table is as good as anyone's.
    wait_until(lambda: "slot_state" in _body(cut)["impaired"], "the outage seen", STALE_AFTER_S + 5)
    time.sleep(max(0.0, cut_at + STALE_AFTER_S + 0.5 - time.monotonic()))
    assert _health(cut).status_code == 200 and _chat(cut, "model-b") == 200

    manage(direct, "shell", "-c", DISABLE_B)  # committed, and announced over Redis
    version = int(manage(direct, "shell", "-c", DB_VERSION).split()[-1])
    wait_until(
        lambda: _health(cut).status_code == 503,
        "the lagging process to say it cannot route",
        STALE_AFTER_S + 5,
        0.1,
        show=lambda: _body(cut),
    )
    body = _body(cut)
    assert (body["ok"], body["route"]) == (False, False)
    assert body["impaired"][0] == "table" and "database" in body["impaired"]
    assert f"lags version {version}" in body["cannot_route"], body
    assert _chat(cut, "model-b") == 200  # what a balancer now sends elsewhere
    assert _health(other).status_code == 200
    assert _body(other)["version"] == version and _chat(other, "model-b") == 404

    proxy.restore()
    wait_until(
        lambda: _health(cut).status_code == 200 and _body(cut)["version"] == version,
        "the lagging process to catch up",
        5,
        0.1,
    )
    assert _chat(cut, "model-b") == 404


def _redis_server(port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*("redis-server", "--port", str(port), "--bind", "127.0.0.1"), *REDIS_QUIET],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_until(answers, f"redis-server on port {port}", 10, 0.05)
    return proc


@pytest.mark.redis
def test_redis_away_is_200_with_record_false(
    tmp_path: Path, fakes: dict[str, ServerThread], processes: list[Hal0Process]
) -> None:
    port = free_port()
    redis = _redis_server(port, tmp_path / "redis.log")
    try:
        env = server_env(tmp_path, REDIS_URL=f"redis://127.0.0.1:{port}/0")
        _slots(env, tmp_path, fakes)
        server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
        processes.append(server)
        wait_until(lambda: _all_well(server), "nothing impaired", 10, show=lambda: _body(server))
        assert _body(server)["redis"] == {"reachable": True}

        redis.terminate()
        redis.wait(10)
        r = _health(server)
        body = r.json()
        assert r.status_code == 200, body
        assert body["redis"] == {"reachable": False} and "redis" in body["impaired"]
        assert (body["route"], body["record"]) == (True, False)
        assert _chat(server) == 200

        redis = _redis_server(port, tmp_path / "redis.log")
        wait_until(
            lambda: _body(server)["redis"] == {"reachable": True}, "Redis answering again", 5
        )
    finally:
        redis.terminate()
        redis.wait(10)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("kind", "auth", "missing"),
    # Keys are read before the table: with keys asked for (auto: if any exist), who may call
    # is what is missing first.
    [("uvicorn", "off", "table_unavailable"), ("daphne", "auto", "keys_unavailable")],
)
def test_a_process_that_never_read_its_table_answers_503_until_it_can(
    kind: str,
    auth: str,
    missing: str,
    tmp_path: Path,
    pg_url: str,
    proxy: CutProxy,
    fakes: dict[str, ServerThread],
    processes: list[Hal0Process],
) -> None:
    """A server started while the database is away has no table to route by: it starts
    anyway (Uvicorn's start-up used to fail; Daphne's first request was a 500), /healthz
    says so with 503, /v1 answers 503 table_unavailable in the client's protocol, and it
    routes as soon as the database answers."""
    from dispatch.management.commands.serve import server_command

    _slots(server_env(tmp_path, DATABASE_URL=pg_url), tmp_path, fakes)
    env = server_env(
        tmp_path, DATABASE_URL=proxy.url(pg_url), HAL0_PROBE_INTERVAL_S="0.5", HAL0_API_AUTH=auth
    )
    proxy.cut()
    port = free_port()
    command = server_command(kind, "127.0.0.1", port, None)
    server = Hal0Process(env, tmp_path / f"{kind}.log", command=command, port=port)
    processes.append(server)
    server.wait_ready()
    r = _health(server)
    body = r.json()
    assert r.status_code == 503, body
    assert (body["ok"], body["route"], body["record"], body["slots"]) == (False, False, False, {})
    assert body["impaired"][:2] == ["table", "database"]
    assert body["cannot_route"].startswith("no routing table yet")
    body = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
    for r in (
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=5),
        httpx.get(server.url + "/v1/models", timeout=5),
    ):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == missing and r.headers["Retry-After"]
    r = httpx.post(server.url + "/v1/messages", json={**body, "max_tokens": 5}, timeout=5)
    assert r.status_code == 503 and r.json()["type"] == "error", r.text  # Anthropic's shape
    assert r.json()["error"]["code"] == missing
    r = httpx.get(server.url + "/api/tags", timeout=5)
    assert r.status_code == 503 and "has not read its" in r.json()["error"], r.text
    proxy.restore()
    wait_until(lambda: _health(server).status_code == 200, "a table", 5, 0.1)
    body = _body(server)
    assert body["route"] is True and set(body["slots"]) == {"a", "b"}
    assert _chat(server) == 200
    assert "Traceback" not in server.log(), server.log()
