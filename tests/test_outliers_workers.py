"""Outlier ejection across workers (issue 24): two real hal0web processes on PostgreSQL and
Redis in front of one fake upstream that this test kills, restarts, hangs and heals.

A dead server is the watcher's case, not an outlier: once it is back and probed ready,
both workers serve it at once. A slot that answers its probes but not its requests is
ejected by the worker that saw its requests fail, and every worker honours it within a
second (the ejection is in the slot's row: ``dispatch.coordination.ejections``); the
leading watcher's passing probe after the back-off ends it for every worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until
from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env

CHAT = "/v1/chat/completions"
BODY = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def upstream() -> Iterator[list[ServerThread]]:
    """The fake's server threads (the one running last): stopped after the test."""
    servers = [ServerThread(FakeUpstream("a", models=["model-a"])).start()]
    yield servers
    for server in servers:
        server.stop()


def _slot_row(pg_url: str) -> tuple[str, bool]:
    """Slot a's state and whether its row holds an ejection in force, as every process
    reads them."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT state, ejected_until IS NOT NULL FROM dispatch_slot WHERE name = 'a'"
        ).fetchone()
    assert row is not None
    return str(row[0]), bool(row[1])


def _workers(
    tmp_path: Path,
    url: str,
    processes: list[Hal0Process],
    pg_url: str,
    first_byte_timeout_s: float = 30,
    **settings: str,
) -> tuple[Hal0Process, Hal0Process]:
    """Two workers in front of slot a: (leader, standby), both serving it."""
    env = server_env(
        tmp_path,
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url_or_skip(),
        HAL0_PROBE_INTERVAL_S="0.5",
        **settings,
    )
    manage(env, "migrate", "-v0")
    folder = tmp_path / "slots"
    folder.mkdir()
    (folder / "a.toml").write_text(
        f'name = "a"\nurl = "{url}/v1"\nkind = "openai"\n\n[model]\ndefault = "model-a"\n\n'
        f"[limits]\nfirst_byte_timeout_s = {first_byte_timeout_s}\n"
    )
    manage(env, "slots", "import", str(folder))
    workers = [Hal0Process(env, tmp_path / f"worker-{i}.log").wait_ready() for i in (1, 2)]
    processes.extend(workers)
    wait_until(lambda: sum("leads the watcher" in w.log() for w in workers) == 1, "one leader", 10)
    [leader] = [w for w in workers if "leads the watcher" in w.log()]
    [standby] = [w for w in workers if w is not leader]
    for w in workers:
        wait_until(_serving(w), f"{w.url} to serve model-a", 10)
    return leader, standby


def _serving(worker: Hal0Process) -> Callable[[], bool]:
    return lambda: _status(worker) == 200


def _showing(worker: Hal0Process, state: str) -> Callable[[], bool]:
    return lambda: _shown(worker) == state


def _told(worker: Hal0Process, pg_url: str) -> Callable[[], str]:
    """What a wait that timed out shows: the slot as the worker and its row say, its log."""
    return lambda: f"{_shown(worker)}, row {_slot_row(pg_url)}:\n{worker.log()[-3000:]}"


def _status(worker: Hal0Process) -> int:
    return httpx.post(worker.url + CHAT, json=BODY, timeout=10).status_code


def _shown(worker: Hal0Process) -> str:
    """Slot a's state as the worker's /healthz says it (``degraded`` while ejected); it asks
    nothing of the slot."""
    return str(httpx.get(worker.url + "/healthz", timeout=5).json()["slots"]["a"])


async def _burst(workers: tuple[Hal0Process, ...], each: int) -> list[int]:
    """``each`` requests to every worker at once: the statuses."""
    async with httpx.AsyncClient(timeout=10) as client:
        answers = await asyncio.gather(
            *(client.post(w.url + CHAT, json=BODY) for w in workers for _ in range(each))
        )
    return [r.status_code for r in answers]


@pytest.mark.postgres
@pytest.mark.redis
def test_a_slot_that_comes_back_serves_at_once_on_every_worker(
    tmp_path: Path, upstream: list[ServerThread], processes: list[Hal0Process], pg_url: str
) -> None:
    """Requests that meet the dead server's refused port before the watcher's `offline`
    reaches their worker are the watcher's case: once the server is back and probed ready,
    neither worker keeps it out (before: 503 `slot_unavailable` for the 30 s back-off)."""
    port = upstream[0].port
    leader, standby = _workers(
        tmp_path, upstream[0].url, processes, pg_url, HAL0_OUTLIER_BACKOFF_S="30"
    )
    upstream[0].stop()  # killed: its port refuses
    # Many requests at once on both workers, while their tables still say ready.
    statuses = asyncio.run(_burst((leader, standby), each=12))
    assert set(statuses) <= {502, 503}, statuses
    wait_until(lambda: _slot_row(pg_url) == ("offline", False), "the watcher to see it down", 5)

    upstream.append(ServerThread(FakeUpstream("a", models=["model-a"]), port=port).start())
    wait_until(lambda: _slot_row(pg_url) == ("ready", False), "the watcher to see it back", 10)
    for w in (leader, standby):
        wait_until(
            _serving(w),
            f"{w.url} to serve the slot that came back",
            1.0,  # the table reload's bound; an ejection would have lasted 30 s
            show=_told(w, pg_url),
        )
    assert "out of rotation" not in leader.log() + standby.log()


@pytest.mark.postgres
@pytest.mark.redis
def test_one_workers_ejection_holds_on_every_worker_and_a_passing_probe_ends_it_everywhere(
    tmp_path: Path, upstream: list[ServerThread], processes: list[Hal0Process], pg_url: str
) -> None:
    fake = upstream[0].app
    leader, standby = _workers(
        tmp_path,
        upstream[0].url,
        processes,
        pg_url,
        first_byte_timeout_s=0.3,
        HAL0_OUTLIER_BACKOFF_S="2",
    )
    fake.delay_headers_s = 5  # its requests hang; its probes (/v1/models) still answer
    # The standby sees the failures (it runs no watcher: no probe result reaches it but
    # through the database).
    for _ in range(3):
        assert httpx.post(standby.url + CHAT, json=BODY, timeout=10).status_code == 504
    asked = len(fake.seen(CHAT))
    # Honoured by the other worker within a second, though none of its requests failed.
    wait_until(
        _showing(leader, "degraded"),
        "the leader to honour the standby's ejection",
        1.0,
        show=_told(leader, pg_url),
    )
    r = httpx.post(leader.url + CHAT, json=BODY, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "slot_unavailable", r.text
    assert "degraded" in r.json()["error"]["message"]
    assert len(fake.seen(CHAT)) == asked  # it never reached the slot
    assert _shown(standby) == "degraded"

    # Healed. No request is sent: the leader's probe once the back-off is over ends the
    # ejection for both workers (before: only for the leader's own record).
    fake.delay_headers_s = 0
    for w in (leader, standby):
        wait_until(
            _showing(w, "ready"),
            f"{w.url} to take the slot back after a passing probe",
            2 + 0.5 + 1.5,  # the back-off, a probe interval, and the time to reach them all
            show=_told(w, pg_url),
        )
    assert _slot_row(pg_url) == ("ready", False)
    assert _status(leader) == 200 and _status(standby) == 200
    assert len(fake.seen(CHAT)) == asked + 2
