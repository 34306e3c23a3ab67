"""Models on demand against the fake Lemonade and Ollama servers (tests/fake_lemonade.py,
tests/fake_ollama.py, written from their documented APIs), through hal0web with its watcher
and loader: each model's load state read from the server's own words, loads asked through the
server's own load call before the request is sent, one load at a time, failures told at once,
room made by hal0web itself (never the server's own eviction), busy models held, idle models
unloaded, pinned ones kept.

Each fake records what it did in order (``history``). A tap in front of it adds what it was
asked, as it arrived, to the same list: so a test reads "asked to load B, B loading, B loaded,
asked to chat with B, B served" and knows the load was hal0web's call, not one the chat set off.

Ollama does not say how many models it keeps loaded (``OLLAMA_MAX_LOADED_MODELS`` is in no
answer), so hal0web cannot make room there before a load: the points about a limit are
Lemonade's alone.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from dispatch.lifecycle import control
from dispatch.lifecycle.loader import loader
from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot
from tests.fake_lemonade import FakeLemonade
from tests.fake_loading import EVICT, EXPIRE, LOAD, LOADED, SERVED, UNLOAD
from tests.fake_ollama import FakeOllama
from tests.fake_wire import Receive, Send
from tests.fakes import ServerThread
from tests.polling import wait_until

SLOT = "s"
# What the tap writes into the fake's history: the server was asked to load, unload, chat.
ASKED_LOAD, ASKED_UNLOAD, ASKED_CHAT = "asked to load", "asked to unload", "asked to chat"
FAILING_WHY = "llama-server exited with code 1"


@dataclass
class Served:
    """One kind's fake behind a slot: its models by role (A is loaded at the start, BROKEN
    fails to load) and how the slot's API root hangs off the server."""

    kind: str
    fake: FakeLemonade | FakeOllama
    a: str
    b: str
    c: str
    broken: str

    @property
    def models(self) -> list[str]:
        return [self.a, self.b, self.c, self.broken]


def _lemonade() -> Served:
    names = ["Qwen3-0.6B-GGUF", "Gemma-3-4b-it-GGUF", "Llama-3.2-1B-Instruct-GGUF", "Broken-GGUF"]
    fake = FakeLemonade(models=names, limit=1, failing={names[3]: FAILING_WHY})
    return Served("lemonade", fake, *names)


def _ollama() -> Served:
    names = ["llama3.2:1b", "gemma3:latest", "qwen3:0.6b", "broken:latest"]
    fake = FakeOllama(models=names, failing={names[3]: FAILING_WHY})
    return Served("ollama", fake, *names)


KINDS = {"lemonade": _lemonade, "ollama": _ollama}
API_ROOT = {"lemonade": "/api/v1", "ollama": "/v1"}


class Tap:
    """In front of a fake: every POST it gets is written into the fake's history as it
    arrives (what it asks, of which model), then handed to the fake as it came."""

    def __init__(self, fake: FakeLemonade | FakeOllama) -> None:
        self.fake = fake

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.fake(scope, receive, send)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        asked = _asked(scope["path"], body)
        if asked is not None:
            self.fake.history.append(asked)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.fake(scope, replay, send)


def _asked(path: str, body: bytes) -> tuple[str, str] | None:
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    model = str(req.get("model_name") or req.get("model") or "")
    if path.endswith("/chat/completions"):
        return (ASKED_CHAT, model)
    if path.endswith("/api/v1/load"):
        return (ASKED_LOAD, model)
    if path.endswith("/api/v1/unload"):
        return (ASKED_UNLOAD, model)
    if path == "/api/generate":  # Ollama: no prompt loads; no prompt and keep_alive 0 unloads
        if req.get("prompt"):
            return (ASKED_CHAT, model)
        return (ASKED_UNLOAD if req.get("keep_alive") == 0 else ASKED_LOAD, model)
    return None


@pytest.fixture(params=list(KINDS))
def served(request: Any, transactional_db: None, settings: Any) -> Iterator[Served]:
    """One kind's fake with its first model loaded, behind slot ``s`` (before hal0web starts:
    ask for it before ``hal0``). Every kind, unless a test names one (``LEMONADE_ONLY``)."""
    settings.HAL0_SWAP_WAIT_S = 10
    settings.HAL0_SWAP_HOLD_S = 2
    s = KINDS[request.param]()
    s.fake.loaded[s.a] = time.time()
    server = ServerThread(Tap(s.fake)).start()
    add_slot(SLOT, server.url + API_ROOT[s.kind], s.models, kind=s.kind)
    yield s
    server.stop()


# A point that needs a limit the server tells: Lemonade's alone (see the module's doc).
LEMONADE_ONLY = pytest.mark.parametrize("served", ["lemonade"], indirect=True)


def loads_of() -> dict[str, str]:
    return dict(SlotModel.objects.filter(slot__name=SLOT).values_list("model_id", "load_state"))


def ready(hal0: ServerThread, s: Served, limit: int | None = None) -> None:
    """hal0web up, the slot read as one that loads models (with ``limit``), A loaded."""
    httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()
    wait_until(lambda: Slot.objects.get(name=SLOT).loads_models, what="the slot to load models")
    if limit is not None:
        wait_until(lambda: Slot.objects.get(name=SLOT).model_limit == limit, what="its limit")
    wait_until(lambda: loads_of()[s.a] == "loaded", what="A read as loaded")


def chat(hal0: ServerThread, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(hal0.url + "/v1/chat/completions", json=body, timeout=30)


def at_once(*work: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Run each call in its own thread; their answers, in the order given."""
    answers: list[httpx.Response | None] = [None] * len(work)

    def run(i: int) -> None:
        answers[i] = work[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def of(history: list[tuple[str, str]], *steps: str) -> list[tuple[str, str]]:
    """The history's entries of these steps only, in order."""
    return [h for h in history if h[0] in steps]


# --- states ---------------------------------------------------------------------------------


def test_load_states_are_read_from_the_server(served, hal0):
    s = served
    ready(hal0, s)
    assert loads_of() == {s.a: "loaded", s.b: "unloaded", s.c: "unloaded", s.broken: "unloaded"}
    # Lemonade says how many it keeps (health's max_models.llm); Ollama does not.
    expected = s.fake.limit if s.kind == "lemonade" else 0
    assert Slot.objects.get(name=SLOT).model_limit == expected


@LEMONADE_ONLY
def test_lemonade_with_no_limit_reads_none(served, hal0):
    served.fake.limit = 0  # the server's -1: no limit
    ready(hal0, served, limit=0)


# --- loads ------------------------------------------------------------------------------------


def test_an_unloaded_model_is_loaded_by_hal0webs_own_call_before_the_chat(served, hal0):
    s = served
    s.fake.limit = 2  # room for B beside A (Ollama keeps 3)
    ready(hal0, s, limit=2 if s.kind == "lemonade" else 0)
    answer = chat(hal0, s.b)
    assert answer.status_code == 200, answer.text
    # The load was hal0web's call, answered before the chat was sent: the chat found B in
    # memory and loaded nothing (a chat that loaded it would come before the load).
    assert of(s.fake.history, ASKED_LOAD, ASKED_CHAT, LOAD, LOADED, SERVED, UNLOAD, EVICT) == [
        (ASKED_LOAD, s.b),
        (LOAD, s.b),
        (LOADED, s.b),
        (ASKED_CHAT, s.b),
        (SERVED, s.b),
    ]
    assert s.fake.load_waiters_max == 1  # no chat ever waited on a load inside the server
    wait_until(lambda: loads_of()[s.b] == "loaded", what="B read as loaded")
    assert loads_of()[s.a] == "loaded"
    # Loaded now: the next request costs no wait and no load.
    again = chat(hal0, s.b)
    assert again.status_code == 200 and again.headers["X-Hal0-Queued-Ms"] == "0"
    assert s.fake.loads == [s.b]


def test_requests_for_the_model_being_loaded_join_one_load(served, hal0):
    s = served
    s.fake.limit, s.fake.load_delay_s = 2, 1.0
    ready(hal0, s, limit=2 if s.kind == "lemonade" else 0)
    answers = at_once(*[lambda: chat(hal0, s.b)] * 5)
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    assert s.fake.loads == [s.b]
    assert of(s.fake.history, ASKED_LOAD) == [(ASKED_LOAD, s.b)]  # one call, not five
    assert s.fake.load_waiters_max == 1 and s.fake.loads_active_max == 1
    assert s.fake.steps(SERVED) == [s.b] * 5


def test_a_request_that_arrives_mid_load_joins_it_and_hears_the_wait(served, hal0):
    s = served
    s.fake.limit, s.fake.load_delay_s = 2, 2.5
    ready(hal0, s, limit=2 if s.kind == "lemonade" else 0)
    first: list[httpx.Response] = []
    early = threading.Thread(target=lambda: first.append(chat(hal0, s.b)))
    early.start()
    wait_until(lambda: s.fake.loading == {s.b}, what="B loading in the server")
    wait_until(lambda: loads_of()[s.b] == "loading", what="B read as loading")
    # Mid-load: a stream for B waits with the first, and is told so while it waits.
    body = {"model": s.b, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    early.join()
    assert first and first[0].status_code == 200
    comments = [line for line in lines if line.startswith(": hal0 queued")]
    assert comments and all(f"model={s.b}" in c for c in comments), lines
    assert any("reason=loading" in c for c in comments), comments
    assert lines[-1] == "data: [DONE]"
    # It waited out the rest of the one load, not a load of its own.
    assert s.fake.loads == [s.b] and of(s.fake.history, ASKED_LOAD) == [(ASKED_LOAD, s.b)]
    assert s.fake.load_waiters_max == 1
    assert int(first[0].headers["X-Hal0-Queued-Ms"]) >= 2000


def test_a_failed_load_fails_at_once_with_the_servers_reason_and_states_are_reread(
    served, hal0, settings
):
    s = served
    s.fake.limit = 2
    ready(hal0, s, limit=2 if s.kind == "lemonade" else 0)
    began = time.monotonic()
    answer = chat(hal0, s.broken)
    took = time.monotonic() - began
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_load_failed"
    assert FAILING_WHY in error["message"] and f"'{s.broken}'" in error["message"]
    assert took < settings.HAL0_SWAP_WAIT_S / 4, took
    assert of(s.fake.history, ASKED_CHAT) == []  # the request never reached the server
    if s.kind == "lemonade":
        # After a failed load Lemonade unloads every model and tries once more.
        assert s.fake.loads == [s.broken, s.broken] and s.fake.evictions == [s.a]
        expected_a = "unloaded"
    else:
        assert s.fake.loads == [s.broken] and s.fake.unloads == []
        expected_a = "loaded"
    # Every model's state read again: the table says what the server did to the others.
    wait_until(lambda: loads_of()[s.a] == expected_a, what=f"A read as {expected_a}")
    failed = SlotModel.objects.get(slot__name=SLOT, model_id=s.broken)
    assert failed.load_state == "failed" and FAILING_WHY in failed.load_error
    # ... and it stays so (the server lists it unloaded, and says nothing of the failure).
    time.sleep(1.0)
    failed.refresh_from_db()
    assert failed.load_state == "failed" and FAILING_WHY in failed.load_error
    # A model that loads still loads after it.
    assert chat(hal0, s.b).status_code == 200


# --- room, holds, swaps (Lemonade: it tells its limit) -----------------------------------------


@LEMONADE_ONLY
def test_at_the_limit_hal0web_unloads_the_least_recently_used_idle_model_itself(served, hal0):
    s = served
    s.fake.limit = 2
    s.fake.loaded[s.b] = time.time()  # A and B in memory: full
    ready(hal0, s, limit=2)
    wait_until(lambda: loads_of()[s.b] == "loaded", what="B read as loaded")
    # B used last (by hal0web's count too): A is the least recently used.
    assert chat(hal0, s.a).status_code == 200
    assert chat(hal0, s.b).status_code == 200
    s.fake.history.clear()
    answer = chat(hal0, s.c)
    assert answer.status_code == 200, answer.text
    assert s.fake.evictions == []  # the server's own eviction never ran
    assert of(s.fake.history, ASKED_LOAD, ASKED_UNLOAD, ASKED_CHAT, LOAD, UNLOAD, EVICT) == [
        (ASKED_UNLOAD, s.a),
        (UNLOAD, s.a),
        (ASKED_LOAD, s.c),
        (LOAD, s.c),
        (ASKED_CHAT, s.c),
    ]
    wait_until(
        lambda: (
            loads_of() | {s.broken: ""}
            == {s.a: "unloaded", s.b: "loaded", s.c: "loaded", s.broken: ""}
        ),
        what="A out, B and C in",
    )


@LEMONADE_ONLY
def test_a_busy_model_is_not_unloaded_under_its_request(served, hal0):
    s = served
    ready(hal0, s, limit=1)
    s.fake.chunks, s.fake.chunk_gap_s = 8, 0.15  # a stream of about 1 s on A
    streamed: list[int] = []

    def long_stream() -> None:
        body = {"model": s.a, "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=30) as r:
            streamed.append(sum(1 for line in r.iter_lines() if line.startswith("data: {")))

    stream = threading.Thread(target=long_stream)
    stream.start()
    wait_until(lambda: s.fake.busy[s.a], what="the stream on A")
    answer = chat(hal0, s.b)
    stream.join()
    assert answer.status_code == 200, answer.text
    assert streamed == [8]  # the stream on A ran to its end
    history = s.fake.history
    # hal0web asked for A's unload only once its stream was done (held, not merely queued
    # behind it inside the server), then loaded B itself.
    assert history.index((SERVED, s.a)) < history.index((ASKED_UNLOAD, s.a))
    assert history.index((UNLOAD, s.a)) < history.index((ASKED_LOAD, s.b))
    assert s.fake.evictions == []


@LEMONADE_ONLY
def test_a_model_that_just_turned_busy_is_held_too(served, hal0):
    """Each process tells the loader its requests in flight at most every 0.5 s; a model
    that turns busy is told at once, or the loader would take it for idle meanwhile."""
    s = served
    ready(hal0, s, limit=1)
    assert chat(hal0, s.a).status_code == 200
    # The loader has just heard that A is idle again: the next report waits 0.5 s.
    wait_until(lambda: loader.usage.busy(SLOT) == {s.a: 0}, what="A idle, as told", every=0.01)
    s.fake.chunks, s.fake.chunk_gap_s = 6, 0.15
    streamed: list[int] = []

    def stream() -> None:
        body = {"model": s.a, "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=30) as r:
            streamed.append(sum(1 for line in r.iter_lines() if line.startswith("data: {")))

    on_a = threading.Thread(target=stream)
    on_a.start()
    wait_until(lambda: s.fake.busy[s.a], what="the stream on A", every=0.01)
    answer = chat(hal0, s.b)
    on_a.join()
    assert answer.status_code == 200 and streamed == [6]
    history = s.fake.history
    served_a = [i for i, h in enumerate(history) if h == (SERVED, s.a)]
    assert len(served_a) == 2
    assert served_a[1] < history.index((ASKED_UNLOAD, s.a)), history


def _workload(hal0: ServerThread, s: Served) -> list[httpx.Response]:
    """A B A A C, 0.1 s apart, each answer 0.4 s long: B asks for a swap while A is busy and
    more requests for A are coming."""
    answers: list[httpx.Response | None] = [None] * 5

    def send(i: int, model: str) -> None:
        time.sleep(0.1 * i)
        answers[i] = chat(hal0, model)

    threads = [
        threading.Thread(target=send, args=(i, m)) for i, m in enumerate([s.a, s.b, s.a, s.a, s.c])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [a for a in answers if a is not None]


@LEMONADE_ONLY
def test_the_hold_serves_a_busy_model_before_swapping_it_out(served, hal0, settings):
    s = served
    s.fake.load_delay_s, s.fake.reply_delay_s = 0.2, 0.4
    ready(hal0, s, limit=1)
    swaps: dict[float, list[str]] = {}
    for hold in (2.0, 0.0):
        settings.HAL0_SWAP_HOLD_S = hold
        s.fake.history.clear()
        answers = _workload(hal0, s)
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        assert s.fake.evictions == []  # every swap was hal0web's
        assert sorted(s.fake.steps(SERVED)) == sorted([s.a, s.b, s.a, s.a, s.c])
        swaps[hold] = s.fake.loads
        # Back to A alone, through the server's own API, for the next round.
        api = Slot.objects.get(name=SLOT).url
        httpx.post(api + "/unload", json={}, timeout=10).raise_for_status()
        httpx.post(api + "/load", json={"model_name": s.a}, timeout=10).raise_for_status()
        wait_until(
            lambda: loads_of()[s.a] == "loaded" and loads_of()[s.c] == "unloaded",
            what="A alone again",
        )
    print(f"swaps for A B A A C: hold 2 s {swaps[2.0]}, no hold {swaps[0.0]}")
    # With the hold, B waits while A is busy, and the two later As are served on A meanwhile:
    # B, then C. Without it, A is marked for unloading as soon as B asks, so the later As
    # queue behind B and load A back: B, A, C.
    assert swaps[2.0] == [s.b, s.c]
    assert len(swaps[2.0]) < len(swaps[0.0])
    assert swaps[0.0] == [s.b, s.a, s.c]


# --- idle unloads, pins -------------------------------------------------------------------------


def test_a_model_idle_past_the_slots_idle_timeout_is_unloaded(served, hal0):
    s = served
    Slot.objects.filter(name=SLOT).update(unload_idle_s=1.0)
    ready(hal0, s)
    assert chat(hal0, s.a).status_code == 200
    used = time.monotonic()
    wait_until(lambda: loads_of()[s.a] == "unloaded", what="A unloaded when idle", timeout=10)
    assert time.monotonic() - used >= 1.0
    assert of(s.fake.history, ASKED_UNLOAD, UNLOAD, EVICT, EXPIRE) == [
        (ASKED_UNLOAD, s.a),
        (UNLOAD, s.a),
    ]


def test_a_pinned_model_is_never_unloaded_when_idle(served, hal0):
    s = served
    s.fake.limit = 2
    Slot.objects.filter(name=SLOT).update(unload_idle_s=0.5)
    ready(hal0, s, limit=2 if s.kind == "lemonade" else 0)
    control.pin(SLOT, s.a)
    assert chat(hal0, s.a).status_code == 200
    assert chat(hal0, s.b).status_code == 200
    wait_until(lambda: loads_of()[s.b] == "unloaded", what="B unloaded when idle", timeout=10)
    time.sleep(1.0)  # A is as idle as B was
    assert loads_of()[s.a] == "loaded"
    assert s.fake.unloads == [s.b] and s.a in s.fake.loaded


@LEMONADE_ONLY
def test_a_pinned_model_is_never_unloaded_to_make_room(served, hal0):
    s = served
    ready(hal0, s, limit=1)
    control.pin(SLOT, s.a)
    answer = chat(hal0, s.b)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "model_load_failed"
    assert "pinned" in answer.json()["error"]["message"]
    assert of(s.fake.history, ASKED_LOAD, ASKED_UNLOAD, ASKED_CHAT) == []
    assert s.fake.in_memory() == [s.a]
