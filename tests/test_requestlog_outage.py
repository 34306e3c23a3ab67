"""Request-log rows through a PostgreSQL outage (issue 24): a batch the database cannot take
waits at the head of the queue and is tried again, so every row is written, in order, once
the database is back; only the rows the queue had no room for are lost, and counted."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatch.observability import requestlog
from dispatch.observability.decisions import DecisionRecord
from tests.cut_proxy import CutProxy
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until
from tests.processes import Hal0Process, manage, server_env

QUEUE = 40  # the process's HAL0_LOG_QUEUE_SIZE


@pytest.fixture
def upstream() -> Iterator[ServerThread]:
    server = ServerThread(FakeUpstream("a", models=["model-a"])).start()
    yield server
    server.stop()


def _logged(pg_url: str) -> list[str]:
    """The request ids in the request log, in the order they were written (read directly,
    not through the proxy)."""
    import psycopg

    with psycopg.connect(pg_url, connect_timeout=3) as conn:
        rows = conn.execute("SELECT request_id FROM dispatch_requestlog ORDER BY id").fetchall()
    return [r[0] for r in rows]


def _metrics(client: httpx.Client) -> dict[str, float]:
    return {
        s.name: s.value
        for f in text_string_to_metric_families(client.get("/metrics").text)
        for s in f.samples
        if s.name.startswith("hal0_request_log")
    }


def _chat(client: httpx.Client) -> str:
    body = {"model": "model-a", "messages": [{"role": "user", "content": "hi"}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text  # routing needs no database: the table is in memory
    return r.headers["X-Request-Id"]


@pytest.mark.postgres
def test_rows_wait_out_an_outage_in_order_and_only_those_beyond_the_queue_are_lost(
    tmp_path: Path, pg_url: str, proxy: CutProxy, upstream: ServerThread
) -> None:
    env = server_env(
        tmp_path,
        DATABASE_URL=proxy.url(pg_url),
        HAL0_METRICS_PUBLIC="true",
        HAL0_LOG_QUEUE_SIZE=str(QUEUE),
        HAL0_PROBE_INTERVAL_S="0.5",
    )
    folder = tmp_path / "slots"
    folder.mkdir()
    (folder / "a.toml").write_text(
        f'name = "a"\nurl = "{upstream.url}/v1"\nkind = "openai"\n[model]\ndefault = "model-a"\n'
    )
    manage(env, "migrate", "-v0")
    manage(env, "slots", "import", str(folder))
    server = Hal0Process(env, tmp_path / "hal0.log").wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            wait_until(
                lambda: client.get("/healthz").json()["slots"] == {"a": "ready"}, "a ready", 10
            )
            before = [_chat(client) for _ in range(5)]
            wait_until(lambda: _logged(pg_url) == before, "the first rows", 10)

            # A blip, as a restart: the writer's kept connection dies under it, and the rows
            # offered meanwhile are written on a fresh one.
            proxy.cut()
            blip = [_chat(client) for _ in range(3)]
            time.sleep(0.2)
            proxy.restore()
            wait_until(lambda: _logged(pg_url) == before + blip, "the blip's rows", 10)

            # An outage longer than the back-off: more rows than the queue holds.
            failures = _metrics(client)["hal0_request_log_write_failures_total"]
            proxy.cut()
            cut_at = time.monotonic()
            during = [_chat(client) for _ in range(QUEUE + 15)]
            wait_until(
                lambda: _metrics(client)["hal0_request_log_write_failures_total"] >= failures + 3,
                "the writer to try again while the database is away",
                10,
                0.1,
            )
            away = _metrics(client)
            outage_s = time.monotonic() - cut_at
            assert away["hal0_request_log_queued"] == QUEUE  # waiting, not lost...
            assert away["hal0_request_log_dropped_total"] == 15  # ...but those beyond room
            # Backing off, not spinning: 0.25 s doubling up to 2 s between tries.
            tries = away["hal0_request_log_write_failures_total"] - failures
            assert tries <= 5 + outage_s / 2, (tries, outage_s)
            assert _logged(pg_url) == before + blip
            proxy.restore()
            wait_until(
                lambda: _logged(pg_url) == before + blip + during[:QUEUE],
                "every row that waited, in order",
                10,
                0.1,
            )
            after = _metrics(client)
            assert after["hal0_request_log_queued"] == 0
            assert after["hal0_request_log_written_total"] == 5 + 3 + QUEUE
            assert after["hal0_request_log_dropped_total"] == 15
    finally:
        server.stop()
    log = server.log_path.read_text()
    # One warning when writes begin to fail and one when they succeed again, per outage.
    assert len(re.findall("could not write request-log rows", log)) == 2, log
    assert len(re.findall("request-log rows are written again", log)) == 2, log
    assert "15 more found the queue full" in log


def _record(i: int) -> DecisionRecord:
    return DecisionRecord(
        request_id=f"row-{i}", endpoint="chat/completions", model="m", status=200, at=time.time()
    )


def test_a_row_the_database_refuses_is_lost_alone_and_counted(transactional_db):
    """Not every failure is the database away: a row it cannot take (here a negative count,
    refused by the column's check) is lost alone, and the rows around it are written."""
    from dispatch.models import RequestLog

    writer = requestlog.Writer()
    for i in range(5):
        rec = _record(i)
        if i == 2:
            rec.prompt_tokens = -1
        assert writer.offer(rec)
    writer.start()
    assert writer.flush(5)
    assert (writer.written, writer.failed, writer.lost, writer.backlog) == (4, 1, 1, 0)
    assert list(RequestLog.objects.order_by("id").values_list("request_id", flat=True)) == [
        "row-0",
        "row-1",
        "row-3",
        "row-4",
    ]
