"""Models on demand across workers: two real hal0web processes on PostgreSQL and Redis in
front of one llama.cpp router (tests/fake_llama_router.py, at most one model loaded, each
load about a second), asked for different models of it at once.

One process leads (the watcher lease: a PostgreSQL advisory lock, ``coordination.leases``)
and runs the one loader; the other's requests reach it over Redis (``events.WATCHER_GROUP``:
their demands and usage), and hear back its news (``events.SYNC_GROUP``, their place in the
queue) and the load states (the database). The router runs in this process, so the test
reads what it was asked, in order.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fake_llama_router import FakeRouter
from tests.fakes import ServerThread
from tests.polling import wait_until
from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env

MODELS = ["m1", "m2", "m3", "m4"]


@pytest.fixture
def served() -> Iterator[tuple[FakeRouter, str]]:
    """The router (m1 loaded, room for one) and its URL."""
    fake = FakeRouter("router", models=MODELS, models_max=1, load_delay_s=1.0, chunks=3)
    fake.chunk_gap_s = 0.1  # each answer takes a moment: its model is busy meanwhile
    fake.status["m1"] = "loaded"
    server = ServerThread(fake).start()
    yield fake, server.url
    server.stop()


def _loads(pg_url: str) -> tuple[bool, int, dict[str, str]]:
    """The slot's row as every process reads it: loads models, its limit, each model's state."""
    import psycopg

    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT id, loads_models, model_limit FROM dispatch_slot WHERE name = 'r'"
        ).fetchone()
        assert row is not None
        states = conn.execute(
            "SELECT model_id, load_state FROM dispatch_slotmodel WHERE slot_id = %s", (row[0],)
        ).fetchall()
    return bool(row[1]), int(row[2]), dict(states)


def _ask(worker: Hal0Process, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(worker.url + "/v1/chat/completions", json=body, timeout=40)


def _stream(worker: Hal0Process, model: str) -> tuple[int, list[str]]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", worker.url + "/v1/chat/completions", json=body, timeout=40) as r:
        return r.status_code, [line for line in r.iter_lines() if line]


def _workers(
    tmp_path: Path, url: str, processes: list[Hal0Process], pg_url: str, hold_s: float
) -> tuple[Hal0Process, Hal0Process]:
    """Two workers in front of slot ``r`` (the router), its models read: (leader, standby)."""
    env = server_env(
        tmp_path,
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url_or_skip(),
        HAL0_PROBE_INTERVAL_S="0.5",
        HAL0_SWAP_WAIT_S="30",
        HAL0_SWAP_HOLD_S=str(hold_s),
    )
    manage(env, "migrate", "-v0")
    folder = tmp_path / "slots"
    folder.mkdir()
    (folder / "r.toml").write_text(
        f'name = "r"\nurl = "{url}/v1"\nkind = "llamacpp"\n\n'
        f'[model]\ndefault = "m1"\nmodels = {MODELS!r}\n'.replace("'", '"')
    )
    manage(env, "slots", "import", str(folder))
    workers = [Hal0Process(env, tmp_path / f"worker-{i}.log").wait_ready() for i in (1, 2)]
    processes.extend(workers)

    # One leads: the lease is a PostgreSQL advisory lock; the other stands by.
    wait_until(lambda: sum("leads the watcher" in w.log() for w in workers) == 1, "one leader", 10)
    [leader] = [w for w in workers if "leads the watcher" in w.log()]
    [standby] = [w for w in workers if w is not leader]
    first = {m: "loaded" if m == "m1" else "unloaded" for m in MODELS}
    wait_until(lambda: _loads(pg_url) == (True, 1, first), "the router's models read", 10)
    time.sleep(0.6)  # every process's table follows the database within 0.25 s
    return leader, standby


@pytest.mark.postgres
@pytest.mark.redis
def test_two_workers_asking_for_different_models_get_one_load_at_a_time_in_order(
    tmp_path: Path, served: tuple[FakeRouter, str], processes: list[Hal0Process], pg_url: str
) -> None:
    """No request lost, one load at a time, in the order the models were first asked for
    across both workers. (``served`` comes before ``processes``: the router stops after the
    workers, whose leader follows its /models/sse stream to the end.)"""
    router, url = served
    leader, standby = _workers(tmp_path, url, processes, pg_url, hold_s=3)

    # Interleaved, a quarter second apart (each arrives well before the next on the leader),
    # in an order neither sorted nor reversed: the first ask for a model sets when it loads.
    plan = [
        (leader, "m4"),  # m1 is unloaded first (idle), then m4 loads
        (standby, "m2"),  # a stream: it hears its place in the queue, from the leader's news
        (leader, "m3"),
        (standby, "m4"),  # m4 is loading: it joins that load
        (leader, "m2"),  # m2 is asked already: it joins that demand
    ]
    answers: dict[int, httpx.Response] = {}
    streamed: dict[int, tuple[int, list[str]]] = {}

    def send(i: int, worker: Hal0Process, model: str) -> None:
        time.sleep(0.25 * i)
        if i == 1:
            streamed[i] = _stream(worker, model)
        else:
            answers[i] = _ask(worker, model)

    threads = [threading.Thread(target=send, args=(i, *p)) for i, p in enumerate(plan)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - began
    print(f"5 requests over 3 swaps, two workers: {took:.1f} s")

    # No request lost: every one answered by its own model, whichever worker took it.
    for i, answer in answers.items():
        assert answer.status_code == 200, (i, answer.text, leader.log(), standby.log())
        assert answer.json()["model"] == plan[i][1]
        assert int(answer.headers["X-Hal0-Queued-Ms"]) > 0  # it waited for its load
    status, lines = streamed[1]
    assert status == 200 and lines[-1] == "data: [DONE]", lines
    assert any(line.startswith("data: {") and '"m2"' in line for line in lines), lines

    # One load at a time in the server, each asked by hal0web (no autoload by a request),
    # in the order the models were first asked for, across both workers.
    assert router.loading_max == 1
    loads = [m for path, m in router.asked if path == "/models/load"]
    assert loads == ["m4", "m2", "m3"], router.asked
    assert router.load_log == ["m4", "m2", "m3"]
    assert router.unload_log == ["m1", "m4", "m2"]
    # Never a model unloaded under a request, by hal0web or by the router's own eviction.
    assert router.unloaded_busy == [] and router.evicted_busy == []
    assert sorted(router.served) == ["m2", "m2", "m3", "m4", "m4"]

    # The standby's stream heard its place from the leader's news (over Redis): a position
    # is only ever read from that news.
    comments = [line for line in lines if line.startswith(": hal0 queued")]
    assert any(re.search(r"position=\d", c) for c in comments), comments
    # The loads ran in the leader's loader alone.
    assert "slot r: loading m2" in leader.log()
    assert "slot r: loading" not in standby.log()


@pytest.mark.postgres
@pytest.mark.redis
def test_a_model_loaded_for_another_workers_request_serves_it_before_it_is_swapped_out(
    tmp_path: Path, served: tuple[FakeRouter, str], processes: list[Hal0Process], pg_url: str
) -> None:
    """The hold is shorter than a load: by the time m2 is loaded, the request queued behind
    it for m3 has waited longer than the hold. m2's own request (on the standby, which
    hears of the load through the database and Redis) must still be served on it."""
    router, url = served
    leader, standby = _workers(tmp_path, url, processes, pg_url, hold_s=0.3)
    answers: dict[str, httpx.Response] = {}

    def ask(worker: Hal0Process, model: str, after: float) -> None:
        time.sleep(after)
        answers[model] = _ask(worker, model)

    threads = [
        threading.Thread(target=ask, args=(standby, "m2", 0.0)),
        threading.Thread(target=ask, args=(leader, "m3", 0.2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {m: a.status_code for m, a in answers.items()} == {"m2": 200, "m3": 200}
    assert router.load_log == ["m2", "m3"], router.asked  # no load of m2 again, by anyone
    assert router.unloaded_busy == [] and router.evicted_busy == []
    assert router.served == ["m2", "m3"]
