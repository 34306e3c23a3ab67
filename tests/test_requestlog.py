"""The request log: one row per request after a burst, drops counted, retention, bodies off."""

from __future__ import annotations

import datetime as dt
import threading
import time

import httpx

from dispatch.observability import requestlog
from dispatch.observability.decisions import DecisionRecord
from tests.polling import logged, wait_until

HERMES_MODEL = "qwen3-coder-reap-25b-a3b-q5km"


def chat(client: httpx.Client, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "secret prompt"}], **extra}
    return client.post("/v1/chat/completions", json=body)


def test_one_row_per_request_after_a_burst(seed_slots, hal0, settings):
    from dispatch.models import ApiKey, RequestLog

    _, key = ApiKey.issue("burst-key")
    ids: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(
            base_url=hal0.url, timeout=10, headers={"Authorization": f"Bearer {key}"}
        ) as c:
            for _ in range(25):
                r = chat(c, HERMES_MODEL)
                assert r.status_code == 200
                with lock:
                    ids.append(r.headers["X-Request-Id"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        r = chat(c, "nope")  # refused (401: no key) — still one row
    assert r.status_code == 401
    logged(200, request_id__in=ids)
    rows = RequestLog.objects.filter(request_id__in=ids)
    assert rows.count() == 200 == len(set(ids))
    row = rows.first()
    assert row is not None
    assert (row.client, row.endpoint, row.model, row.slot, row.upstream_model) == (
        "key:burst-key",
        "chat/completions",
        HERMES_MODEL,
        "agent-hermes",
        HERMES_MODEL,
    )
    assert (row.resolution, row.status, row.error) == ("model:agent-hermes", 200, "")
    assert (row.prompt_tokens, row.completion_tokens) == (3, 4)
    assert row.duration_ms > 0 and row.ttft_ms is None
    assert row.why.startswith("answered by agent-hermes: the only slot serving")
    assert row.candidates == [
        {
            "slot": "agent-hermes",
            "state": "ready",
            "priority": 0,
            "inflight": row.candidates[0]["inflight"],
        }
    ]
    assert row.body == row.answer == ""  # HAL0_LOG_BODIES is off by default: nothing stored
    logged(1, request_id=r.headers["X-Request-Id"])  # its batch may come after theirs
    refused = RequestLog.objects.get(request_id=r.headers["X-Request-Id"])
    assert (refused.status, refused.error, refused.slot) == (401, "missing_api_key", "")


def test_bodies_only_when_the_operator_turns_them_on_and_capped(seed_slots, hal0, settings):

    settings.HAL0_LOG_BODIES = True
    settings.HAL0_LOG_BODY_MAX_BYTES = 40
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        r = chat(c, HERMES_MODEL)
    [row] = logged(request_id=r.headers["X-Request-Id"])
    assert row.body == r.request.content.decode()[:40]
    assert len(row.body) == 40
    assert row.answer == r.content.decode()[:40]
    with (
        httpx.Client(base_url=hal0.url, timeout=10) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": HERMES_MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
        ) as s,
    ):
        streamed = s.read().decode()
    [row] = logged(request_id=s.headers["X-Request-Id"])
    assert row.answer == streamed[:40] and row.answer.startswith("data: {")


def _record(i: int) -> DecisionRecord:
    return DecisionRecord(
        request_id=f"drop-{i}", endpoint="chat/completions", model="m", status=200, at=time.time()
    )


def test_a_full_queue_drops_and_counts_never_blocks(transactional_db):
    from dispatch.models import RequestLog

    writer = requestlog.Writer(limit=3)  # its thread not started yet: nothing drains it
    t0 = time.perf_counter()
    offered = [writer.offer(_record(i)) for i in range(10)]
    assert time.perf_counter() - t0 < 0.05  # put_nowait: no waiting for room
    assert offered == [True] * 3 + [False] * 7
    assert writer.dropped == 7
    writer.start()
    assert writer.flush(5)
    assert writer.written == 3
    assert sorted(RequestLog.objects.values_list("request_id", flat=True)) == [
        "drop-0",
        "drop-1",
        "drop-2",
    ]


def test_the_outputs_follow_their_switches(transactional_db, settings):
    from dispatch.observability import decisions, metrics

    assert requestlog.output in decisions.outputs and metrics.output in decisions.outputs
    settings.HAL0_REQUEST_LOG = False
    assert requestlog.output not in decisions.outputs and metrics.output in decisions.outputs
    settings.HAL0_METRICS = False
    assert decisions.outputs == [decisions.log_output, decisions.event_output]
    settings.HAL0_REQUEST_LOG = True
    assert decisions.outputs[-1] is requestlog.output


def _row_at(when: dt.datetime, request_id: str):
    from dispatch.models import RequestLog

    return RequestLog.objects.create(
        at=when, request_id=request_id, endpoint="chat/completions", status=200, duration_ms=1.0
    )


def test_retention_prunes_old_rows(transactional_db, settings):
    from dispatch.models import RequestLog

    settings.HAL0_LOG_RETENTION_DAYS = 14
    now = dt.datetime.now(dt.UTC)
    _row_at(now - dt.timedelta(days=15), "old")
    _row_at(now - dt.timedelta(days=13), "recent")
    assert requestlog.prune(now) == 1
    left = RequestLog.objects.filter(request_id__in=["old", "recent"])
    assert list(left.values_list("request_id", flat=True)) == ["recent"]


def test_the_watcher_prunes_when_it_starts(seed_slots, settings):
    """The process that runs the watcher (the leader) prunes; nothing else has to."""
    from dispatch.models import RequestLog

    settings.HAL0_LOG_RETENTION_DAYS = 1
    _row_at(dt.datetime.now(dt.UTC) - dt.timedelta(days=2), "stale")
    _row_at(dt.datetime.now(dt.UTC), "fresh")
    from hal0web.asgi import application
    from tests.fakes import ServerThread

    settings.HAL0_WATCHER = True
    settings.HAL0_PROBE_INTERVAL_S = 0.2
    application._started = False
    server = ServerThread(application).start()
    try:
        httpx.get(server.url + "/healthz")
        wait_until(
            lambda: not RequestLog.objects.filter(request_id="stale").exists(),
            "the watcher to prune the stale row",
            10,
            0.1,
        )
    finally:
        server.stop()
    assert RequestLog.objects.filter(request_id="fresh").exists()


def test_admin_lists_read_only_with_filters_and_search_by_request_id(admin_client, settings):
    from django.urls import reverse

    from dispatch.models import RequestLog

    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    now = dt.datetime.now(dt.UTC)
    for i, (slot, status) in enumerate([("primary", 200), ("agent-hermes", 200), ("primary", 503)]):
        RequestLog.objects.create(
            at=now,
            request_id=f"req-{i:04d}",
            client="key:ci",
            endpoint="chat/completions",
            model="m",
            slot=slot,
            status=status,
            duration_ms=1.0,
            why=f"answered by {slot}: test",
        )
    url = reverse("admin:dispatch_requestlog_changelist")
    page = admin_client.get(url).content.decode()
    assert "req-0000" in page and "req-0002" in page and "answered by agent-hermes: test" in page
    assert 'href="?slot=agent-hermes"' in page  # the filters: slot, model, status, key, time
    assert 'href="?status=503"' in page and 'href="?client=key%3Aci"' in page
    assert "at__gte=" in page
    found = admin_client.get(url, {"q": "req-0001"}).content.decode()
    assert "req-0001" in found and "req-0000" not in found
    only = admin_client.get(url, {"slot": "primary", "status": "503"}).content.decode()
    assert "req-0002" in only and "req-0000" not in only
    row = RequestLog.objects.get(request_id="req-0000")
    assert admin_client.get(reverse("admin:dispatch_requestlog_add")).status_code == 403
    detail = admin_client.get(reverse("admin:dispatch_requestlog_change", args=[row.pk]))
    assert detail.status_code == 200 and b'name="_save"' not in detail.content
    assert (
        admin_client.post(reverse("admin:dispatch_requestlog_delete", args=[row.pk])).status_code
        == 403
    )


def test_a_failover_is_explained_in_the_row_and_the_log_line(fake, no_watcher, hal0, caplog):
    """The preferred slot's server is gone (its state still says ready: nothing probed it):
    the request fails over, and every output says so in words."""
    import json
    import logging

    from tests.conftest import add_slot
    from tests.fakes import free_port

    _, server = fake
    add_slot("first", f"http://127.0.0.1:{free_port()}/v1", ["m1"], priority=5, state="ready")
    add_slot("second", server.url + "/v1", ["m1"], state="ready")
    with (
        caplog.at_level(logging.INFO, logger="hal0.dispatch"),
        httpx.Client(base_url=hal0.url, timeout=10) as c,
    ):
        r = chat(c, "m1")
    assert r.status_code == 200 and r.headers["X-Hal0-Resolution"] == "failover:first->second"
    [row] = logged(request_id=r.headers["X-Request-Id"])
    assert row.why == (
        "answered by second: first failed before answering, so the request failed over; "
        "first choice: the highest priority (5) of 2 slots serving 'm1'"
    )
    assert [c["slot"] for c in row.candidates] == ["first", "second"]
    line = next(
        json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "hal0.dispatch"
    )
    assert line["why"]["rule"] == "failover" and line["why"]["text"] == row.why


def test_the_writer_keeps_its_connection_between_batches_and_drops_it_after_a_failure(
    transactional_db,
):
    """Its prepared INSERTs live with its connection (re-preparing a 50-row INSERT every batch
    cost more than the rows: docs/performance.md); a failed batch must not leave it on a
    broken one, nor lose its rows: they are written on the fresh one."""
    from django.db import connection

    from dispatch.models import RequestLog

    writer = requestlog.Writer()
    seen: list[object] = []
    insert = writer._insert

    def spied(batch: list[requestlog.Row]) -> None:
        insert(batch)
        seen.append(connection.connection)
        if len(seen) == 2:
            connection.connection.close()  # broken under Django's feet, as a restart would

    writer._insert = spied
    writer.start()
    for i in range(4):
        assert writer.offer(_record(i))
        assert writer.flush(5)
    assert seen[0] is seen[1]  # one connection for both batches
    # The third batch met the broken connection and was written on a fresh one.
    assert seen[2] is not seen[1] and seen[3] is seen[2]
    assert (writer.written, writer.lost) == (4, 0)
    assert RequestLog.objects.filter(request_id__startswith="drop-").count() == 4


def test_a_flush_cuts_the_gathering_short(transactional_db, monkeypatch):
    """The writer gathers a batch for LINGER_S after its first row; a flush (shutdown, a
    test, bench/quiet_server.py's count) has what it holds written now, not after that."""
    from dispatch.models import RequestLog

    monkeypatch.setattr(requestlog, "LINGER_S", 60.0)
    writer = requestlog.Writer()
    writer.start()
    assert writer.offer(_record(0))
    assert writer.flush(5)
    assert RequestLog.objects.filter(request_id__startswith="drop-").count() == 1
