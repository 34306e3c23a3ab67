"""The fake Lemonade and Ollama servers (tests/fake_lemonade.py, tests/fake_ollama.py) load
and unload as their documentation says the real ones do: pinned here over loopback, asked
through each kind's own calls and read through each kind's own readings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from dispatch import kinds
from dispatch.kinds import Call, Loads, ModelLoad
from dispatch.routing import states
from dispatch.routing.table import SlotEntry, make_slot
from tests.fake_lemonade import FakeLemonade
from tests.fake_loading import (
    EVICT,
    EXPIRE,
    FAILED,
    LOAD,
    LOADED,
    SERVED,
    UNLOAD,
    LoadingServer,
)
from tests.fake_ollama import FakeOllama
from tests.fakes import ServerThread
from tests.polling import wait_until

LEMONADE = kinds.get("lemonade")
OLLAMA = kinds.get("ollama")
A, B, C = "Qwen3-0.6B-GGUF", "Gemma-3-4b-it-GGUF", "Broken-GGUF"


def chat(model: str, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def ask(client: httpx.Client, call: Call | None) -> httpx.Response:
    assert call is not None
    return client.request(call.method, call.url, json=call.body, timeout=call.timeout_s)


def both(*work) -> list[httpx.Response]:
    """Run the calls at once (each from its own thread), and return their answers in order."""
    with ThreadPoolExecutor(len(work)) as pool:
        return [f.result() for f in [pool.submit(w) for w in work]]


@pytest.fixture
def served(request) -> Iterator[tuple[LoadingServer, SlotEntry, httpx.Client]]:
    fake: LoadingServer = request.param()
    server = ServerThread(fake).start()
    root = server.url + ("/api/v1" if isinstance(fake, FakeLemonade) else "/v1")
    slot = make_slot(fake.name, root, kind=fake.name)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        yield fake, slot, client
    server.stop()


def lemonade(**knobs):
    return lambda: FakeLemonade(models=[A, B, C], failing={C: "llama-server exited"}, **knobs)


# --- Lemonade ---------------------------------------------------------------------------------


def lemonade_loads(client: httpx.Client) -> Loads:
    loads = LEMONADE.read_loads(
        client.get("/api/v1/models").json(), client.get("/api/v1/health").json(), None
    )
    assert loads is not None
    return loads


def loaded(loads: Loads) -> set[str]:
    return {m for m, load in loads.models.items() if load.state == states.LOADED}


@pytest.mark.parametrize("served", [lemonade(limit=1)], indirect=True)
def test_lemonade_lists_every_model_and_loads_one_in_place_of_another(served):
    fake, slot, client = served
    assert lemonade_loads(client) == Loads(
        models=dict.fromkeys([A, B, C], ModelLoad(states.UNLOADED)),
        loads_models=True,
        model_limit=1,
    )
    first = ask(client, LEMONADE.load_call(slot, A))
    assert first.status_code == 200 and first.json()["status"] == "success"
    assert LEMONADE.call_failed(first.status_code, first.json()) is None
    assert loaded(lemonade_loads(client)) == {A}
    assert client.get("/api/v1/health").json()["model_loaded"] == A
    ask(client, LEMONADE.load_call(slot, A))  # loaded already: nothing to do
    ask(client, LEMONADE.load_call(slot, B))  # at its limit: the LRU model goes first
    assert loaded(lemonade_loads(client)) == {B}
    assert fake.history == [(LOAD, A), (LOADED, A), (LOAD, B), (EVICT, A), (LOADED, B)]


@pytest.mark.parametrize("served", [lemonade(limit=2)], indirect=True)
def test_a_failed_lemonade_load_unloads_everything_and_is_tried_once_more(served):
    fake, slot, client = served
    ask(client, LEMONADE.load_call(slot, A))
    ask(client, LEMONADE.load_call(slot, B))
    failed = ask(client, LEMONADE.load_call(slot, C))
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "model_load_error"
    said = LEMONADE.call_failed(failed.status_code, failed.json())
    assert said == f"500: Failed to load model '{C}': llama-server exited"
    assert loaded(lemonade_loads(client)) == set()
    assert fake.loads == [A, B, C, C]
    assert fake.steps(EVICT) == [A, B] and fake.steps(FAILED) == [C, C]


@pytest.mark.parametrize("served", [lemonade(limit=1, load_delay_s=0.3)], indirect=True)
def test_a_lemonade_request_loads_its_model_and_requests_for_it_join_that_load(served):
    fake, _, client = served
    replies = both(
        lambda: client.post("/api/v1/chat/completions", json=chat(A)),
        lambda: client.post("/api/v1/chat/completions", json=chat(A, stream=True)),
    )
    assert replies[0].json()["choices"][0]["message"]["content"] == "hello from lemonade"
    events = [
        json.loads(line[6:]) for line in replies[1].text.splitlines() if line.startswith("data: {")
    ]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "hello from lemonade 1 2"
    assert replies[1].text.endswith("data: [DONE]\n\n")
    assert fake.loads == [A]  # one load, two waiters
    assert fake.load_waiters_max == 2 and fake.load_waiters == 0
    assert client.post("/api/v1/chat/completions", json=chat("nope")).status_code == 404


@pytest.mark.parametrize(
    ("served", "at_once"),
    [
        (lemonade(limit=2, load_delay_s=0.2), 1),
        (lemonade(limit=2, load_delay_s=0.2, serialize=False), 2),
    ],
    indirect=["served"],
)
def test_lemonade_loads_one_at_a_time_however_many_are_asked(served, at_once):
    fake, slot, client = served
    answers = both(
        lambda: ask(client, LEMONADE.load_call(slot, A)),
        lambda: ask(client, LEMONADE.load_call(slot, B)),
    )
    assert [a.status_code for a in answers] == [200, 200]
    assert fake.load_waiters_max == 2  # two asked at once...
    assert fake.loads_active_max == at_once  # ...and the server loaded one, then the other
    assert sorted(fake.loads) == sorted([A, B]) and fake.evictions == []
    assert loaded(lemonade_loads(client)) == {A, B}


@pytest.mark.parametrize("served", [lemonade(limit=1, chunks=4, chunk_gap_s=0.15)], indirect=True)
def test_lemonade_waits_for_a_models_requests_before_unloading_it(served):
    fake, slot, client = served
    ask(client, LEMONADE.load_call(slot, A))

    def stream_a() -> httpx.Response:
        return client.post("/api/v1/chat/completions", json=chat(A, stream=True))

    def load_b() -> httpx.Response:
        wait_until(lambda: fake.busy[A] == 1, "the stream of A to start")
        return ask(client, LEMONADE.load_call(slot, B))

    streamed, swapped = both(stream_a, load_b)
    assert streamed.text.endswith("data: [DONE]\n\n") and swapped.status_code == 200
    assert fake.evictions == [A]
    assert fake.history.index((SERVED, A)) < fake.history.index((EVICT, A))
    assert loaded(lemonade_loads(client)) == {B}


@pytest.mark.parametrize("served", [lemonade(limit=0)], indirect=True)
def test_lemonade_unloads_what_it_is_asked_to_and_says_so_of_what_it_has_not(served):
    fake, slot, client = served
    assert lemonade_loads(client).model_limit == 0  # max_models -1: no limit
    ask(client, LEMONADE.load_call(slot, A))
    ask(client, LEMONADE.load_call(slot, B))
    gone = ask(client, LEMONADE.unload_call(slot, A))
    assert gone.status_code == 200 and LEMONADE.call_failed(200, gone.json()) is None
    assert loaded(lemonade_loads(client)) == {B}
    again = ask(client, LEMONADE.unload_call(slot, A))
    assert (again.status_code, again.json()) == (404, {"error": f"Model not loaded: {A}"})
    assert LEMONADE.call_failed(again.status_code, again.json()) is None  # unloaded already
    assert client.post("/api/v1/unload").json()["message"] == "All models unloaded successfully"
    assert loaded(lemonade_loads(client)) == set()
    assert fake.steps(UNLOAD) == [A, B] and fake.evictions == []


# --- Ollama -----------------------------------------------------------------------------------

L, G, Q = "llama3.2:1b", "gemma3:latest", "qwen3:0.6b"


def ollama(**knobs):
    return lambda: FakeOllama(
        models=[L, G, Q], failing={Q: "llama runner process has terminated"}, **knobs
    )


def ollama_loads(client: httpx.Client) -> Loads:
    loads = OLLAMA.read_loads(client.get("/v1/models").json(), None, client.get("/api/ps").json())
    assert loads is not None
    return loads


@pytest.mark.parametrize("served", [ollama(limit=1)], indirect=True)
def test_ollama_loads_through_generate_and_evicts_its_lru_model_at_its_limit(served):
    fake, slot, client = served
    assert [m["name"] for m in client.get("/api/tags").json()["models"]] == [L, G, Q]
    assert client.get("/api/version").json()["version"]
    assert loaded(ollama_loads(client)) == set()
    answer = ask(client, OLLAMA.load_call(slot, L))
    assert answer.status_code == 200
    assert answer.json() | {"created_at": ""} == {
        "model": L,
        "created_at": "",
        "response": "",
        "done": True,
    }
    assert OLLAMA.call_failed(200, answer.json()) is None
    [running] = client.get("/api/ps").json()["models"]
    assert running["name"] == running["model"] == L and running["expires_at"]
    ask(client, OLLAMA.load_call(slot, G))
    assert loaded(ollama_loads(client)) == {G}
    assert fake.history == [(LOAD, L), (LOADED, L), (LOAD, G), (EVICT, L), (LOADED, G)]


@pytest.mark.parametrize("served", [ollama()], indirect=True)
def test_ollama_unloads_just_after_it_answers_an_unload(served):
    fake, slot, client = served
    ask(client, OLLAMA.load_call(slot, L))
    gone = ask(client, OLLAMA.unload_call(slot, L))
    assert gone.json()["done_reason"] == "unload"
    wait_until(lambda: loaded(ollama_loads(client)) == set(), "llama3.2 to leave /api/ps")
    assert fake.steps(UNLOAD) == [L]
    assert ask(client, OLLAMA.unload_call(slot, G)).status_code == 200  # not loaded: no matter


@pytest.mark.parametrize("served", [ollama()], indirect=True)
def test_a_failed_ollama_load_says_why_and_leaves_the_others_loaded(served):
    fake, slot, client = served
    ask(client, OLLAMA.load_call(slot, L))
    failed = ask(client, OLLAMA.load_call(slot, Q))
    assert failed.status_code == 500
    assert OLLAMA.call_failed(500, failed.json()) == "500: llama runner process has terminated"
    assert loaded(ollama_loads(client)) == {L}
    missing = ask(client, OLLAMA.load_call(slot, "nope:1b"))
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope:1b' not found"})
    chat_failed = client.post("/v1/chat/completions", json=chat(Q))
    assert chat_failed.status_code == 500
    assert chat_failed.json()["error"]["message"] == "llama runner process has terminated"
    assert fake.loads == [L, Q, Q]


@pytest.mark.parametrize("served", [ollama(limit=1, load_delay_s=0.2)], indirect=True)
def test_an_ollama_request_loads_its_model_one_load_at_a_time(served):
    fake, _, client = served
    answers = both(
        lambda: client.post("/v1/chat/completions", json=chat(L)),
        lambda: client.post("/api/generate", json={"model": G, "prompt": "hi"}),
    )
    assert answers[0].json()["choices"][0]["message"]["content"] == "hello from ollama"
    lines = [json.loads(line) for line in answers[1].text.splitlines()]
    assert "".join(line["response"] for line in lines) == "hello from ollama 1 2"
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert answers[1].headers["content-type"] == "application/x-ndjson"
    assert sorted(fake.loads) == sorted([L, G]) and len(fake.evictions) == 1
    assert fake.load_waiters_max == 2 and fake.loads_active_max == 1
    streamed = client.post("/v1/chat/completions", json=chat(L, stream=True))
    assert streamed.text.endswith("data: [DONE]\n\n")
    missing = client.post("/v1/chat/completions", json=chat("nope:1b"))
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("served", [ollama(default_keep_alive_s=0.2)], indirect=True)
def test_an_ollama_model_leaves_when_its_keep_alive_ends(served):
    fake, slot, client = served
    ask(client, OLLAMA.load_call(slot, L))
    client.post("/api/generate", json={"model": G, "keep_alive": -1})  # stays for good
    wait_until(lambda: loaded(ollama_loads(client)) == {G}, "llama3.2's keep-alive to end")
    assert fake.steps(EXPIRE) == [L]
    [kept] = client.get("/api/ps").json()["models"]
    assert kept["expires_at"].startswith("2318-")
