"""/metrics scraped with prometheus_client's own parser after known traffic."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import add_slot
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until

HERMES_MODEL = "qwen3-coder-reap-25b-a3b-q5km"
REPO = Path(__file__).resolve().parent.parent


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample as {(sample name, labels without `worker`): value}, summed over workers."""
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "worker")
            key = (sample.name, labels)
            out[key] = out.get(key, 0.0) + sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def chat(client: httpx.Client, model: str, **extra) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture
def public_metrics(settings):
    settings.HAL0_METRICS_PUBLIC = True


def test_every_family_and_label_after_known_traffic(public_metrics, seed_slots, fake_pair, hal0):
    fake_pair["agent-hermes"][0].stream_usage = True
    # A slot nobody listens on: its probes fail.
    add_slot("gone", "http://127.0.0.1:9/v1", ["gone-model"])
    with httpx.Client(base_url=hal0.url, timeout=10) as client:
        before = scrape(client.get("/metrics").text)
        assert chat(client, HERMES_MODEL).status_code == 200  # usage 3 + 4 in the JSON
        assert chat(client, "hermes").status_code == 200
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": HERMES_MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
        ) as r:
            r.read()
        assert chat(client, "no-such-model").status_code == 404

        def scraped_once_gone_failed() -> tuple[httpx.Response, dict] | None:
            r = client.get("/metrics")
            after = scrape(r.text)
            return (r, after) if value(after, "hal0_probe_failures_total", slot="gone") else None

        scraped = wait_until(scraped_once_gone_failed, "a failed probe of slot gone", 10, 0.2)
        assert scraped is not None
        r, after = scraped
    assert r.headers["content-type"].startswith("text/plain; version=")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    req = {"endpoint": "chat/completions", "slot": "agent-hermes", "status": "200"}
    assert delta("hal0_requests_total", **req, model=HERMES_MODEL, resolution="model") == 2
    assert delta("hal0_requests_total", **req, model="hermes", resolution="alias") == 1
    # A model nobody serves is not a label value: clients could make up any number of them.
    assert (
        delta(
            "hal0_requests_total",
            endpoint="chat/completions",
            slot="",
            model="",
            status="404",
            resolution="none",
        )
        == 1
    )
    per_slot = {"endpoint": "chat/completions", "slot": "agent-hermes"}
    assert delta("hal0_request_duration_seconds_count", **per_slot) == 3
    assert delta("hal0_time_to_first_byte_seconds_count", **per_slot) == 3
    assert delta("hal0_time_to_first_token_seconds_count", **per_slot) == 1  # the stream
    assert delta("hal0_added_seconds_count", endpoint="chat/completions") == 4
    assert delta("hal0_added_seconds_sum", endpoint="chat/completions") > 0
    tokens = {"slot": "agent-hermes", "model": HERMES_MODEL}
    assert delta("hal0_tokens_total", **tokens, kind="prompt") == 3 + 5  # JSON, stream usage
    assert delta("hal0_tokens_total", **tokens, kind="completion") == 4 + 3
    assert delta("hal0_tokens_total", slot="agent-hermes", model="hermes", kind="prompt") == 3
    assert value(after, "hal0_inflight", slot="agent-hermes") == 0
    assert value(after, "hal0_queued", slot="agent-hermes") == 0
    assert value(after, "hal0_slot_state", slot="agent-hermes", state="ready") == 1
    assert value(after, "hal0_slot_state", slot="agent-hermes", state="offline") == 0
    assert value(after, "hal0_slot_state", slot="gone", state="offline") == 1
    assert value(after, "hal0_probe_duration_seconds_count", slot="agent-hermes") > 0
    assert value(after, "hal0_probe_failures_total", slot="gone") > 0
    # Counters live as long as the process: earlier tests' slots of the same name count too.
    assert delta("hal0_probe_failures_total", slot="agent-hermes") == 0
    kinds = families(r.text)
    for name, kind in {
        "hal0_requests": "counter",
        "hal0_request_duration_seconds": "histogram",
        "hal0_time_to_first_byte_seconds": "histogram",
        "hal0_time_to_first_token_seconds": "histogram",
        "hal0_added_seconds": "histogram",
        "hal0_tokens": "counter",
        "hal0_inflight": "gauge",
        "hal0_queued": "gauge",
        "hal0_slot_state": "gauge",
        "hal0_probe_duration_seconds": "histogram",
        "hal0_probe_failures": "counter",
        "hal0_events_dropped": "counter",
        "hal0_events_missed": "counter",
        "hal0_log_records_dropped": "counter",
        "hal0_request_log_dropped": "counter",
    }.items():
        assert kinds.get(name) == kind, name
    for family in text_string_to_metric_families(r.text):
        if family.name.startswith("hal0_"):
            assert all(s.labels.get("worker") == str(os.getpid()) for s in family.samples)


def test_in_flight_and_queued_per_slot_while_a_slot_is_full(
    public_metrics, seed_slots, fake_pair, hal0
):
    from dispatch.models import Slot

    hermes = Slot.objects.get(name="agent-hermes")
    hermes.max_concurrency = 1
    hermes.save()
    fake_pair["agent-hermes"][0].delay_headers_s = 1.5
    import threading

    with httpx.Client(base_url=hal0.url, timeout=10) as client:
        threads = [threading.Thread(target=chat, args=(client, HERMES_MODEL)) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.7)
        samples = scrape(client.get("/metrics").text)
        for t in threads:
            t.join()
    assert value(samples, "hal0_inflight", slot="agent-hermes") == 1
    assert value(samples, "hal0_queued", slot="agent-hermes") == 1


def test_access_needs_staff_or_a_key_unless_public(
    seed_slots, hal0, settings, client, admin_client
):
    from django.contrib.auth import get_user_model

    from dispatch.models import ApiKey

    r = httpx.get(hal0.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    _, key = ApiKey.issue("prometheus")
    assert (
        httpx.get(hal0.url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    ok = httpx.get(hal0.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200 and "hal0_requests" in ok.text
    assert admin_client.get("/metrics").status_code == 200
    # force_login: django-axes wants the request that Client.login() does not pass.
    client.force_login(get_user_model().objects.create_user("plain", password="pw-pw-pw-pw"))
    assert client.get("/metrics").status_code == 401  # logged in, but not staff
    settings.HAL0_METRICS_PUBLIC = True
    assert httpx.get(hal0.url + "/metrics").status_code == 200
    settings.HAL0_METRICS = False
    assert httpx.get(hal0.url + "/metrics").status_code == 404


# --- two worker processes -------------------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream("solo", models=["solo-model"])
    server = ServerThread(fake).start()
    fake.url = server.url  # type: ignore[attr-defined]
    yield fake
    server.stop()


def _worker(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "hal0web.asgi:application",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    except httpx.TransportError:
        return False


def _solo_requests(text: str) -> tuple[str, float]:
    """One worker's scrape: who it says it is, and the requests it counted for slot solo."""
    [(worker, count)] = [
        (s.labels["worker"], s.value)
        for family in text_string_to_metric_families(text)
        if family.name == "hal0_requests"
        for s in family.samples
        if s.name == "hal0_requests_total" and s.labels["slot"] == "solo"
    ]
    return worker, count


@pytest.mark.postgres
def test_two_workers_give_totals_that_add_up(upstream, tmp_path, pg_url):
    """Two server processes: PostgreSQL, since the embedded SQLite serves one."""
    from tests.fakes import free_port

    env = {
        **os.environ,
        "HAL0_DATA_DIR": str(tmp_path),
        "HAL0_ENV_FILE": str(tmp_path / "no.env"),
        "HAL0_METRICS_PUBLIC": "true",
        "HAL0_WATCHER": "false",
        "HAL0_PROBE_INTERVAL_S": "0.5",
        "HAL0_LOG_LEVEL": "WARNING",
    }
    for name in ("DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"):
        env.pop(name, None)
    env["DATABASE_URL"] = pg_url
    (tmp_path / "slots").mkdir()
    (tmp_path / "slots" / "solo.toml").write_text(
        f'name = "solo"\nurl = "{upstream.url}/v1"\n[model]\ndefault = "solo-model"\n'
    )
    for args in (["migrate", "-v0"], ["slots", "import", str(tmp_path / "slots")]):
        subprocess.run(
            [sys.executable, "manage.py", *args], env=env, cwd=REPO, check=True, capture_output=True
        )
    ports = [free_port(), free_port()]
    procs = [_worker(env, p, tmp_path / f"worker-{p}.log") for p in ports]
    try:
        for port in ports:
            wait_until(
                lambda port=port: _healthy(port),
                f"worker {port} to answer /healthz",
                30,
                0.1,
                show=(tmp_path / f"worker-{port}.log").read_text,
            )
        sent = {ports[0]: 3, ports[1]: 5}
        for port, n in sent.items():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                for _ in range(n):
                    assert chat(c, "solo-model").status_code == 200
        texts = [httpx.get(f"http://127.0.0.1:{p}/metrics").text for p in ports]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    per_worker = [_solo_requests(text) for text in texts]
    assert len({worker for worker, _ in per_worker}) == 2  # each process says who it is
    assert sorted(count for _, count in per_worker) == [3, 5]
    total = scrape("".join(texts))
    assert (
        value(
            total,
            "hal0_requests_total",
            endpoint="chat/completions",
            slot="solo",
            model="solo-model",
            status="200",
            resolution="model",
        )
        == 8
    )


def test_a_key_in_x_api_key_reads_metrics_through_the_apis_own_check(seed_slots, hal0, settings):
    from datetime import timedelta

    from django.utils import timezone

    from dispatch.models import ApiKey

    settings.HAL0_METRICS_PUBLIC = False
    _, key = ApiKey.issue("prometheus")
    ok = httpx.get(hal0.url + "/metrics", headers={"x-api-key": key})
    assert ok.status_code == 200 and "hal0_requests" in ok.text
    bad = httpx.get(hal0.url + "/metrics", headers={"x-api-key": "nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    # An expired key is refused as the API refuses it.
    row, old = ApiKey.issue("old")
    row.expires_at = timezone.now() - timedelta(hours=1)
    row.save()
    gone = httpx.get(hal0.url + "/metrics", headers={"x-api-key": old})
    assert gone.status_code == 401 and gone.json()["error"]["code"] == "expired_api_key"


def test_paths_of_one_kind_are_one_series_and_add_up(monkeypatch) -> None:
    """Requests are kept by their whole resolution path and labelled by its kind when
    scraped (issue 23: no label text per request): two failovers to one slot from different
    slots are one `resolution="failover"` series counting both."""
    from prometheus_client import generate_latest

    from dispatch.observability import metrics
    from dispatch.observability.decisions import DecisionRecord

    monkeypatch.setattr(metrics, "_per_request", {})
    for path in ("failover:x->a", "failover:y->a", "failover:y->a"):
        rec = DecisionRecord.arrived("r", "chat/completions")
        rec.slot, rec.status, rec.resolution_path = "a", 200, path
        metrics.output(rec)
    samples = scrape(generate_latest(metrics.registry).decode())
    labels = {"endpoint": "chat/completions", "slot": "a", "model": "", "status": "200"}
    assert value(samples, "hal0_requests_total", resolution="failover", **labels) == 3
