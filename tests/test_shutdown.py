"""A server that stops (issue 24): new requests refused at once, requests in flight given
HAL0_DRAIN_S, and what still runs then ended in its client's protocol, with a request-log row
saying so.

In process first (the drain started by a call, as the stop signal's handler starts it), then
as real processes: hal0web.server (deploy/Procfile's line) with one worker on SQLite and two
on PostgreSQL, SIGTERM mid-stream, a slow fake upstream behind it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings as django_settings

from dispatch.api.drain import drain
from tests.conftest import add_slot
from tests.fake_slow import GAP_S, MODEL, SlowChat, manifest
from tests.fakes import ServerThread, free_port
from tests.polling import logged, wait_until
from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env

# (path, body) of one streaming request in each client protocol; the slot speaks only
# chat completions, so Anthropic's and Ollama's are translated, event by event.
MESSAGES = [{"role": "user", "content": "hi"}]
STREAMS = {
    "openai": ("/v1/chat/completions", {"model": MODEL, "stream": True, "messages": MESSAGES}),
    "anthropic": (
        "/v1/messages",
        {"model": MODEL, "stream": True, "max_tokens": 64, "messages": MESSAGES},
    ),
    "ollama": ("/api/chat", {"model": MODEL, "stream": True, "messages": MESSAGES}),
}
LONG = 600  # events: a minute, past any drain here


class Stream:
    """One streamed request read to its end by a thread: the raw body, and how it ended."""

    def __init__(self, url: str, path: str, body: dict[str, Any], events: int) -> None:
        self.status = 0
        self.headers: httpx.Headers | None = None
        self.body = b""
        self.error: BaseException | None = None  # the body's framing was not whole
        self.ended_at = 0.0
        self.started = threading.Event()
        self._thread = threading.Thread(
            target=self._read, args=(url + path, body, events), daemon=True
        )
        self._thread.start()

    def _read(self, url: str, body: dict[str, Any], events: int) -> None:
        try:
            with (
                httpx.Client(timeout=30) as client,
                client.stream("POST", url, json=body, headers={"x-events": str(events)}) as r,
            ):
                self.status, self.headers = r.status_code, r.headers
                # Raw chunks: httpx raises if the chunked body's last chunk never came.
                for chunk in r.iter_raw():
                    self.body += chunk
                    self.started.set()
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.started.set()

    def wait_started(self) -> None:
        assert self.started.wait(15), "the stream never began"
        assert self.error is None, repr(self.error)

    def join(self, timeout: float = 30) -> Stream:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream never ended"
        return self

    @property
    def text(self) -> str:
        return self.body.decode()


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """A stream's events as a client's SSE parser reads them: (name, data) by blank lines."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, "\n".join(data)))
    return events


def assert_cut(protocol: str, stream: Stream) -> dict[str, Any]:
    """``stream`` was cut by the drain: its body's framing whole (the last chunk came), and
    its last event the one error event of its protocol. Returns that error."""
    stream.join()
    assert stream.error is None, f"{protocol}: {stream.error!r}; got {stream.body[-300:]!r}"
    assert stream.status == 200, (protocol, stream.status, stream.text[-300:])
    if protocol == "ollama":
        lines = stream.text.splitlines()
        assert all(json.loads(line) for line in lines)  # every line whole
        error = json.loads(lines[-1])
        assert error["code"] == "shutting_down" and "shutting down" in error["error"], error
        assert sum('"error"' in line for line in lines) == 1
        return error
    events = sse_events(stream.text)
    name, data = events[-1]
    error = json.loads(data)  # a complete event: parsed whole
    if protocol == "anthropic":
        assert name == "error"
        assert error["type"] == "error" and error["error"]["code"] == "shutting_down", error
        assert error["error"]["type"] == "overloaded_error"
    else:
        assert name is None
        assert error["error"]["code"] == "shutting_down", error
        assert error["error"]["type"] == "server_error"
        # The fake writes each event in two halves: the cut left one open, and the error
        # event came after a blank line that closed it, not glued onto its half.
        assert not events[-2][1].endswith("}"), events[-2]
    assert sum("shutting_down" in d for _, d in events) == 1
    return error


def assert_whole(stream: Stream) -> None:
    """``stream`` ran to its own end: the upstream's [DONE], no error event."""
    stream.join()
    assert stream.error is None, repr(stream.error)
    assert stream.status == 200
    assert stream.text.rstrip().endswith("data: [DONE]"), stream.text[-200:]
    assert "shutting_down" not in stream.text


def post(url: str, path: str, body: dict[str, Any], timeout: float = 5) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"x-events": "3"}, timeout=timeout)


# --- in process: the drain, started by a call ------------------------------------------------


@pytest.fixture
def slow() -> Iterator[tuple[SlowChat, ServerThread]]:
    app = SlowChat()
    server = ServerThread(app).start()
    yield app, server
    server.stop()


@pytest.fixture
def slow_slot(slow: tuple[SlowChat, ServerThread], transactional_db: None) -> SlowChat:
    add_slot("s", slow[1].url + "/v1", [MODEL], endpoints=["chat/completions"])
    return slow[0]


def test_a_stopping_server_refuses_new_requests_in_their_protocols(slow_slot, hal0, settings):
    """After the stop signal a request gets 503 `shutting_down` at once, in its client's
    protocol, with Retry-After and Connection: close, and a request-log row."""
    settings.HAL0_DRAIN_S = 30
    assert post(hal0.url, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}).is_success
    drain.stop()
    wait_until(lambda: drain.stopping, "the drain to begin", 2)
    answers = {
        protocol: post(hal0.url, path, {**body, "stream": False})
        for protocol, (path, body) in STREAMS.items()
    }
    for protocol, r in answers.items():
        assert r.status_code == 503, (protocol, r.text)
        assert r.headers["Retry-After"] == "1" and r.headers["Connection"] == "close"
        assert r.headers["X-Hal0-Error"] == "1"
    assert answers["openai"].json()["error"]["code"] == "shutting_down"
    assert answers["openai"].json()["error"]["type"] == "server_error"
    anthropic = answers["anthropic"].json()
    assert anthropic["type"] == "error" and anthropic["error"]["code"] == "shutting_down"
    assert answers["ollama"].json()["code"] == "shutting_down"
    assert "shutting down" in answers["ollama"].json()["error"]
    ids = [r.headers["X-Request-Id"] for r in answers.values()]
    rows = logged(3, request_id__in=ids)
    assert {(row.status, row.error) for row in rows} == {(503, "shutting_down")}


def test_the_drain_lets_short_requests_finish_and_cuts_the_rest_in_their_protocols(
    slow_slot, hal0, settings
):
    """In flight when the drain begins: a stream that ends within HAL0_DRAIN_S ends as it
    would have; streams past it end with one complete error event of their protocol, the
    chunked body ended; a request still waiting for its answer gets 503. All logged so."""
    settings.HAL0_DRAIN_S = 1.5
    long = {p: Stream(hal0.url, path, body, LONG) for p, (path, body) in STREAMS.items()}
    short = Stream(hal0.url, *STREAMS["openai"], events=8)  # ~0.8 s
    waiting: dict[str, httpx.Response] = {}
    asked = threading.Thread(
        target=lambda: waiting.setdefault(
            "r",
            httpx.post(
                hal0.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": MESSAGES},
                headers={"x-events": str(LONG)},
                timeout=30,
            ),
        )
    )
    asked.start()
    for s in (*long.values(), short):
        s.wait_started()
    wait_until(lambda: len(drain.requests) == 5, "five requests in flight", 5)
    began = time.monotonic()
    drain.stop()

    assert_whole(short)
    for protocol, s in long.items():
        assert_cut(protocol, s)
        # Cut when the drain ran out, not before (nor long after).
        assert 1.5 - 0.2 <= s.ended_at - began < 1.5 + 2, (protocol, s.ended_at - began)
    asked.join(10)
    r = waiting["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert "HAL0_DRAIN_S" in r.json()["error"]["message"]

    assert slow_slot.ended == 1  # only the short one; the cut ones were closed upstream too
    ids = {s.headers["X-Request-Id"]: p for p, s in long.items() if s.headers}
    rows = logged(3, request_id__in=list(ids))
    assert {(row.status, row.error) for row in rows} == {(200, "shutting_down")}
    assert short.headers is not None
    [row] = logged(1, request_id=short.headers["X-Request-Id"])
    assert (row.status, row.error) == (200, "")
    [row] = logged(1, request_id=r.headers["X-Request-Id"])
    assert (row.status, row.error) == (503, "shutting_down")
    assert not drain.requests


def test_a_stream_still_waiting_for_its_model_is_ended_in_its_protocol(
    transactional_db, hal0, settings
):
    """A stream that began early with comments while its model loads (relay.waiting_stream):
    when the drain runs out, it ends with the error event, not with a cut body."""
    from dispatch.models import Slot
    from tests.fake_llama_router import FakeRouter

    settings.HAL0_DRAIN_S = 1.0
    settings.HAL0_SWAP_WAIT_S = 30
    router = FakeRouter("router", models=["m1", "m2"], models_max=1, chunks=3)
    router.status["m1"] = "loaded"
    router.load_delay_s = 20  # past the drain
    server = ServerThread(router).start()
    try:
        add_slot("r", server.url + "/v1", ["m1", "m2"])
        httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()
        wait_until(lambda: Slot.objects.get(name="r").loads_models, "the slot to load models")
        body = {"model": "m2", "stream": True, "messages": MESSAGES}
        stream = Stream(hal0.url, "/v1/chat/completions", body, 1)
        stream.wait_started()  # its first comment: it waits for m2
        drain.stop()
        stream.join()
    finally:
        server.stop()
    assert stream.error is None and stream.status == 200, repr(stream.error)
    assert stream.text.startswith(": hal0 queued")
    [(name, data)] = sse_events(stream.text)  # the comments are no events
    assert name is None
    assert json.loads(data)["error"]["code"] == "shutting_down"
    assert stream.headers is not None
    [row] = logged(1, request_id=stream.headers["X-Request-Id"])
    assert (row.status, row.error) == (503, "shutting_down")


# --- real processes: deploy/Procfile's line, SIGTERM mid-stream ------------------------------

DRAIN_S = 3.0
# Past HAL0_DRAIN_S, what a stop may take: the cut streams' last events, the connections
# closed, the lifespan shutdown (the request log written), the process gone.
EXIT_SLACK_S = 4.0


def procfile_line() -> str:
    procfile = (django_settings.BASE_DIR / "deploy" / "Procfile").read_text()
    [web] = [
        line.removeprefix("web:").strip()
        for line in procfile.splitlines()
        if line.startswith("web:")
    ]
    return web


def start_recipe(tmp_path: Path, slow_url: str, workers: int, **env_extra: str) -> Hal0Process:
    """hal0web as deploy/Procfile runs it, with ``workers`` workers, on a slot on the slow
    fake; returned once the slot is ready."""
    env = server_env(tmp_path, HAL0_DRAIN_S=str(DRAIN_S), HAL0_PROBE_INTERVAL_S="0.5", **env_extra)
    manage(env, "migrate", "-v0")
    slots = tmp_path / "slots"
    slots.mkdir()
    (slots / "s.toml").write_text(manifest("s", slow_url))
    manage(env, "slots", "import", str(slots))
    port = free_port()
    env.update(
        PORT=str(port),
        WEB_CONCURRENCY=str(workers),
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
    )
    server = Hal0Process(
        env, tmp_path / "web.log", command=["bash", "-c", f"exec {procfile_line()}"]
    )
    server.port = port

    def ready() -> bool:
        if server.proc.poll() is not None:
            raise AssertionError(f"hal0web exited ({server.proc.returncode}):\n{server.log()}")
        try:
            return httpx.get(server.url + "/healthz", timeout=2).json()["slots"] == {"s": "ready"}
        except (httpx.TransportError, ValueError):
            return False

    wait_until(ready, "the slot to be ready", 60, 0.1, show=server.log)
    return server


def new_request(url: str) -> str:
    """A request on a new connection while the server stops: "refused" or "503" (its
    code), never a wait; anything else fails."""
    try:
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES},
            headers={"x-events": "1"},
            timeout=1.0,  # a hang is the failure this guards against
        )
    except httpx.ConnectError:
        return "refused"
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "shutting_down" and r.headers["Retry-After"]
    return "503"


def sigterm_mid_stream(server: Hal0Process) -> dict[str, Any]:
    """Streams in flight in the three protocols (past the drain) and one that ends within
    it, then SIGTERM: (a) new connections refused or 503 at once, (b) the short stream
    whole, (c) the long ones cut with one complete error event each, (e) the process gone
    within HAL0_DRAIN_S and a little. Returns the request ids, for the log's rows (d)."""
    long = {p: Stream(server.url, path, body, LONG) for p, (path, body) in STREAMS.items()}
    short = Stream(server.url, *STREAMS["openai"], events=int(1.5 / GAP_S))
    for s in (*long.values(), short):
        s.wait_started()
    server.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()

    seen = []
    for at in (0.3, 1.0, 2.0):  # during the drain
        time.sleep(max(0.0, stopped + at - time.monotonic()))
        seen.append(new_request(server.url))
    assert_whole(short)
    assert short.ended_at - stopped < DRAIN_S
    for protocol, s in long.items():
        assert_cut(protocol, s)
        assert DRAIN_S - 0.3 <= s.ended_at - stopped < DRAIN_S + 2, (protocol, s.ended_at - stopped)
    try:
        server.proc.wait(DRAIN_S + EXIT_SLACK_S - (time.monotonic() - stopped))
    except Exception:
        pytest.fail(f"still running {DRAIN_S + EXIT_SLACK_S} s after SIGTERM:\n{server.log()}")
    took = time.monotonic() - stopped
    assert "Exception in ASGI application" not in server.log(), server.log()
    print(f"new requests during the drain: {seen}; exited {took:.1f} s after SIGTERM")
    assert all(s.headers is not None for s in (*long.values(), short))
    return {
        "cut": [s.headers["X-Request-Id"] for s in long.values()],  # type: ignore[index]
        "whole": short.headers["X-Request-Id"],  # type: ignore[index]
    }


@pytest.fixture
def slow_server() -> Iterator[ServerThread]:
    server = ServerThread(SlowChat()).start()
    yield server
    server.stop()


@pytest.fixture
def recipes() -> Iterator[list[Hal0Process]]:
    started: list[Hal0Process] = []
    yield started
    for proc in started:
        proc.stop()


def test_sigterm_mid_stream_one_worker_on_sqlite(tmp_path, slow_server, recipes):
    server = start_recipe(tmp_path, slow_server.url, workers=1)
    recipes.append(server)
    ids = sigterm_mid_stream(server)
    with sqlite3.connect(tmp_path / "hal0web.sqlite3") as db:
        rows = dict(
            (rid, (status, error))
            for rid, status, error in db.execute(
                "SELECT request_id, status, error FROM dispatch_requestlog"
            )
        )
    assert [rows.get(rid) for rid in ids["cut"]] == [(200, "shutting_down")] * 3, rows
    assert rows.get(ids["whole"]) == (200, ""), rows


@pytest.mark.postgres
@pytest.mark.redis
def test_sigterm_mid_stream_two_workers(tmp_path, slow_server, recipes, pg_url):
    import psycopg

    server = start_recipe(
        tmp_path, slow_server.url, workers=2, DATABASE_URL=pg_url, REDIS_URL=redis_url_or_skip()
    )
    recipes.append(server)
    ids = sigterm_mid_stream(server)
    with psycopg.connect(pg_url.replace("postgres://", "postgresql://")) as db:
        rows = {
            rid: (status, error)
            for rid, status, error in db.execute(
                "SELECT request_id, status, error FROM dispatch_requestlog"
            )
        }
    assert [rows.get(rid) for rid in ids["cut"]] == [(200, "shutting_down")] * 3, rows
    assert rows.get(ids["whole"]) == (200, ""), rows


def test_shutdown_writes_the_request_log_before_it_returns(transactional_db):
    """Uvicorn ends a process by raising the stop signal again, so no atexit handler runs:
    rows still queued when the lifespan shutdown returns are lost."""
    from dispatch.models import RequestLog
    from dispatch.observability.decisions import DecisionRecord, record
    from hal0web.asgi import application

    async def stop() -> None:
        rec = DecisionRecord.arrived("cut-at-shutdown", "chat/completions")
        rec.failed(503, "shutting_down")
        record(rec)  # sent to the outputs at the loop's next turn
        await application._shutdown()

    asyncio.run(stop())
    row = RequestLog.objects.get(request_id="cut-at-shutdown")  # no wait: written already
    assert (row.status, row.error) == (503, "shutting_down")
