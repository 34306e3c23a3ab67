"""Ollama's own API on hal0web's port, driven by the official ``ollama`` Python client (0.6.3):
served by a slot that speaks only OpenAI's API (translated: tests/fake_openai_chat.py) and
by an Ollama server (passed through: tests/fake_ollama.py), with hal0web's own answers for
the model list, what is loaded, one model's details and the version."""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import ollama
import pytest

from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot
from tests.fake_ollama import FakeOllama
from tests.fake_openai_chat import THOUGHT, FakeChat
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until

# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
def chat_fake(transactional_db: None) -> Iterator[FakeChat]:
    """A chat slot that speaks only OpenAI's API, an embedding slot, a reranker."""
    chat = FakeChat("chat", models=["gemma3", "qwen3", "tagged:latest"])
    emb = FakeChat("emb", models=["nomic"])
    rr = FakeUpstream("rr", models=["rerank-x"])
    servers = [ServerThread(f).start() for f in (chat, emb, rr)]
    add_slot("chat", servers[0].url + "/v1", ["gemma3", "qwen3", "tagged:latest"])
    add_slot("emb", servers[1].url + "/v1", ["nomic"], type="embedding")
    add_slot("rr", servers[2].url + "/v1", ["rerank-x"], type="reranking")
    yield chat
    for server in servers:
        server.stop()


def _ready(hal0: ServerThread, *names: str) -> None:
    httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()
    wait_until(
        lambda: all(Slot.objects.get(name=n).state == "ready" for n in names),
        f"slots {names} ready",
    )


@pytest.fixture
def client(chat_fake: FakeChat, hal0: ServerThread) -> Iterator[ollama.Client]:
    _ready(hal0, "chat", "emb", "rr")
    c = ollama.Client(host=hal0.url, timeout=30)
    yield c
    c.close()


def sent(fake: FakeUpstream, path: str = "/v1/chat/completions") -> dict[str, Any]:
    """The last request the fake got on ``path``, parsed."""
    return fake.seen(path)[-1].json


def _ns(value: Any) -> bool:
    return type(value) is int and value >= 0


# --- chat, translated -------------------------------------------------------------------------


def test_chat_not_streamed_is_one_answer_with_counts_and_durations(client, chat_fake):
    r = client.chat(model="gemma3", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert r.message.role == "assistant" and r.message.content == "echo: hi 1"
    assert r.done is True and r.done_reason == "stop" and r.model == "gemma3"
    assert r.eval_count == 2
    assert r.prompt_eval_count == sum(
        len(json.dumps(m).split()) for m in sent(chat_fake)["messages"]
    )
    assert all(_ns(v) for v in (r.total_duration, r.load_duration, r.eval_duration))
    assert r.total_duration >= r.eval_duration and r.prompt_eval_duration == 0
    datetime.fromisoformat(r.created_at.replace("Z", "+00:00"))  # RFC 3339
    upstream = sent(chat_fake)
    assert upstream["stream"] is False and upstream["model"] == "gemma3"
    assert upstream["messages"] == [{"role": "user", "content": "hi"}]
    assert "keep_alive" not in upstream and "options" not in upstream


def test_chat_streamed_is_ndjson_ending_done_with_the_upstreams_usage(client, chat_fake):
    parts = list(
        client.chat(model="gemma3", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert "".join(p.message.content or "" for p in parts) == "echo: hi 1"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == 2 and last.prompt_eval_count > 0
    assert all(_ns(v) for v in (last.total_duration, last.prompt_eval_duration, last.eval_duration))
    upstream = sent(chat_fake)
    assert upstream["stream"] is True and upstream["stream_options"] == {"include_usage": True}


def test_a_body_without_stream_streams_as_ollama_does(client, hal0, chat_fake):
    body = {"model": "gemma3", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", hal0.url + "/api/chat", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-ndjson"
        assert r.headers["x-hal0-mode"] == "translated" and r.headers["x-hal0-slot"] == "chat"
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert [line["done"] for line in lines][-1] is True
    assert lines[0]["message"] == {"role": "assistant", "content": "echo: hi"}
    assert sent(chat_fake)["stream"] is True


def test_each_upstream_event_goes_out_as_its_line_when_it_comes(client, hal0, chat_fake):
    # The fake sends its next event only once the client has the line of the one before: a
    # translation that held the stream back would never let the next one go.
    got = [threading.Event() for _ in range(3)]
    chat_fake.gates = got
    body = {"model": "gemma3", "messages": [{"role": "user", "content": "hi"}]}
    seen: list[dict[str, Any]] = []
    with httpx.stream("POST", hal0.url + "/api/chat", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line:
                seen.append(json.loads(line))
                if len(seen) <= len(got):
                    got[len(seen) - 1].set()
    assert [s["message"]["content"] for s in seen[:2]] == ["echo: hi", " 1"]
    assert seen[-1]["done"] is True and not chat_fake.gate_timeouts


def test_tool_calls_come_back_with_arguments_as_objects(client, chat_fake):
    messages = [{"role": "user", "content": "weather in Paris?"}]
    r = client.chat(model="gemma3", messages=messages, tools=[WEATHER], stream=False)
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert sent(chat_fake)["tools"][0]["function"]["name"] == "get_weather"
    parts = list(client.chat(model="gemma3", messages=messages, tools=[WEATHER], stream=True))
    calls = [c for p in parts for c in p.message.tool_calls or ()]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert parts[-1].done and parts[-1].done_reason == "stop"


def test_a_tool_result_answers_the_call_it_names(client, chat_fake):
    messages = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    r = client.chat(model="gemma3", messages=messages, tools=[WEATHER], stream=False)
    assert r.message.content == "echo: sunny 1"
    _, assistant, tool = sent(chat_fake)["messages"]
    (call,) = assistant["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}  # JSON text upstream
    assert call["type"] == "function" and tool["tool_call_id"] == call["id"]
    assert tool == {"role": "tool", "content": "sunny", "tool_call_id": call["id"]}


def test_format_json_and_a_schema_are_response_formats(client, chat_fake):
    hi = [{"role": "user", "content": "hi"}]
    r = client.chat(model="gemma3", messages=hi, format="json", stream=False)
    assert json.loads(r.message.content) == {"answer": 42}
    assert sent(chat_fake)["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}}
    client.chat(model="gemma3", messages=hi, format=schema, stream=False)
    assert sent(chat_fake)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }


def test_think_asks_the_template_and_the_reasoning_comes_back_as_thinking(client, chat_fake):
    hi = [{"role": "user", "content": "hi"}]
    r = client.chat(model="gemma3", messages=hi, think=True, stream=False)
    assert r.message.thinking == THOUGHT and r.message.content == "echo: hi 1"
    assert sent(chat_fake)["chat_template_kwargs"] == {"enable_thinking": True}
    parts = list(client.chat(model="gemma3", messages=hi, think=True, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    client.chat(model="gemma3", messages=hi, think="high", stream=False)
    assert sent(chat_fake)["reasoning_effort"] == "high"
    client.chat(model="gemma3", messages=hi, think=False, stream=False)
    assert sent(chat_fake)["chat_template_kwargs"] == {"enable_thinking": False}


def test_images_become_data_uris(client, chat_fake):
    messages = [{"role": "user", "content": "what is it", "images": [PNG]}]
    r = client.chat(model="gemma3", messages=messages, stream=False)
    assert r.message.content == "echo: what is it images=1"
    text, image = sent(chat_fake)["messages"][0]["content"]
    assert text == {"type": "text", "text": "what is it"}
    assert image["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()


def test_options_are_sampling_parameters(client, chat_fake):
    options = {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 7,
        "num_predict": 1,
        "stop": ["x"],
        "num_ctx": 4096,
    }
    hi = [{"role": "user", "content": "hi"}]
    r = client.chat(model="gemma3", messages=hi, options=options, stream=False)
    assert r.done_reason == "length" and r.message.content == "echo: hi"
    upstream = sent(chat_fake)
    assert {k: upstream[k] for k in ("temperature", "top_p", "top_k", "seed", "stop")} == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "seed": 7,
        "stop": ["x"],
    }
    assert upstream["max_tokens"] == 1 and "num_ctx" not in upstream
    assert "options" not in upstream


def test_the_servers_timings_are_the_durations_where_it_sends_them(client, chat_fake):
    chat_fake.send_timings = True
    hi = [{"role": "user", "content": "hi"}]
    r = client.chat(model="gemma3", messages=hi, stream=False)
    assert r.prompt_eval_duration == 12_500_000 and r.eval_duration == 250_000_000
    last = list(client.chat(model="gemma3", messages=hi, stream=True))[-1]
    assert last.prompt_eval_duration == 12_500_000 and last.eval_duration == 250_000_000


# --- generate ---------------------------------------------------------------------------------


def test_generate_is_a_user_message_after_its_system(client, chat_fake):
    r = client.generate(model="gemma3", prompt="hello", system="be brief", stream=False)
    assert r.response == "echo: hello 1" and r.done and r.eval_count == 2
    assert sent(chat_fake)["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
    ]
    parts = list(client.generate(model="gemma3", prompt="hello", stream=True))
    assert "".join(p.response for p in parts) == "echo: hello 1"
    assert parts[-1].done and parts[-1].prompt_eval_count and parts[-1].eval_count == 2
    r = client.generate(model="gemma3", prompt="look", images=[PNG], stream=False)
    assert r.response == "echo: look images=1"


def test_a_raw_generate_and_a_suffix_go_to_completions(client, chat_fake):
    r = client.generate(model="gemma3", prompt="<s>[INST] hi [/INST]", raw=True, stream=False)
    assert r.response == "completed: <s>[INST] hi [/INST]"
    assert sent(chat_fake, "/v1/completions")["prompt"] == "<s>[INST] hi [/INST]"
    parts = list(client.generate(model="gemma3", prompt="def f(", suffix="return x", stream=True))
    assert "".join(p.response for p in parts) == "completed: def f( suffix=return x done"
    assert sent(chat_fake, "/v1/completions")["suffix"] == "return x"
    assert parts[-1].done and parts[-1].eval_count == 2


def test_a_raw_generate_on_a_chat_only_slot_is_a_user_message(client, chat_fake):
    Slot.objects.filter(name="chat").update(endpoints=["chat/completions"])
    slot = Slot.objects.get(name="chat")
    slot.save()  # the table follows the saved row
    wait_until(lambda: _offers("chat") == ["chat/completions"], "the slot offers chat only")
    r = client.generate(model="gemma3", prompt="hi", raw=True, stream=False)
    assert r.response == "echo: hi 1"
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="gemma3", prompt="def f(", suffix="x", stream=False)
    assert err.value.status_code == 400 and "suffix" in err.value.error


def _offers(slot: str) -> list[str]:
    from dispatch.coordination.store import store

    entry = store.table.slots.get(slot)
    return sorted(entry.endpoints) if entry else []


# --- embeddings ---------------------------------------------------------------------------------


def test_embed_gives_every_vector_in_order_with_its_count(client, chat_fake):
    r = client.embed(model="nomic", input=["a", "bbb"])
    assert [list(v) for v in r.embeddings] == [[1.0, 0.0], [3.0, 1.0]]
    assert r.model == "nomic" and r.prompt_eval_count == 6 and _ns(r.total_duration)
    assert client.embed(model="nomic", input="abcd").embeddings == [[4.0, 0.0]]
    assert list(client.embeddings(model="nomic", prompt="abcde").embedding) == [5.0, 0.0]


# --- hal0web's own: tags, show, ps, version ---------------------------------------------------


def test_tags_lists_what_ollamas_api_reaches(client):
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"gemma3", "qwen3", "tagged:latest", "nomic"}  # not the reranker
    gemma = listed["gemma3"]
    assert gemma.details.parameter_size == "1.2B" and gemma.size == 807_694_464
    assert re.fullmatch(r"[0-9a-f]{64}", gemma.digest)
    assert gemma.details.quantization_level == "" and gemma.details.family == ""


def test_show_says_capabilities_and_context_length(client, hal0):
    shown = client.show("gemma3")
    assert {"completion", "tools"} <= set(shown.capabilities)
    assert "embedding" not in shown.capabilities
    arch = shown.modelinfo["general.architecture"]
    assert shown.modelinfo[f"{arch}.context_length"] == 8192
    assert shown.modelinfo["general.parameter_count"] == 1_235_814_432
    assert client.show("nomic").capabilities == ["embedding"]
    assert client.show("gemma3:latest").capabilities == shown.capabilities
    legacy = httpx.post(hal0.url + "/api/show", json={"name": "qwen3"}, timeout=10)
    assert legacy.status_code == 200 and "completion" in legacy.json()["capabilities"]
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404 and "nope" in err.value.error


def test_ps_lists_a_plain_servers_models_as_loaded_for_good(client):
    running = {m.model: m for m in client.ps().models}
    assert set(running) == {"gemma3", "qwen3", "tagged:latest", "nomic"}
    assert running["gemma3"].expires_at.year == 2318  # never unloaded by hal0web
    assert running["gemma3"].size_vram == 0 and running["gemma3"].context_length == 8192


def test_version_is_numeric(client, hal0):
    r = httpx.get(hal0.url + "/api/version", timeout=10)
    assert r.status_code == 200 and re.fullmatch(r"\d+\.\d+\.\d+", r.json()["version"])


# --- names, errors, 404 -----------------------------------------------------------------------


def test_latest_is_stripped_unless_the_tagged_name_is_known(client, chat_fake):
    hi = [{"role": "user", "content": "hi"}]
    r = client.chat(model="gemma3:latest", messages=hi, stream=False)
    assert r.model == "gemma3:latest"  # the name asked, as Ollama answers
    assert sent(chat_fake)["model"] == "gemma3"
    client.chat(model="tagged:latest", messages=hi, stream=False)
    assert sent(chat_fake)["model"] == "tagged:latest"
    client.chat(model="tagged", messages=hi, stream=False)  # what an Ollama server would take
    assert sent(chat_fake)["model"] == "tagged:latest"


def test_errors_are_ollamas_shape_with_their_status(client, hal0):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert err.value.status_code == 404 and "nope" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        list(client.chat(model="nope", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert err.value.status_code == 404
    bad = httpx.post(
        hal0.url + "/api/chat",
        json={"model": "gemma3", "messages": [{"role": "user", "content": 5}]},
        timeout=10,
    )
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)
    assert "content" in bad.json()["error"]
    late = httpx.post(
        hal0.url + "/api/generate",
        json={"model": "gemma3", "prompt": "hi", "keep_alive": "later"},
        timeout=10,
    )
    assert late.status_code == 400 and "keep_alive" in late.json()["error"]


def test_unknown_api_paths_are_a_json_404(client, hal0):
    for method, path in (("POST", "/api/pull"), ("GET", "/api/nothing"), ("DELETE", "/api/")):
        r = httpx.request(method, hal0.url + path, json={"model": "x"}, timeout=10)
        assert r.status_code == 404, (path, r.text)
        assert r.headers["content-type"] == "application/json"
        assert path in r.json()["error"] and "/api/chat" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("gemma3")
    assert err.value.status_code == 404
    r = httpx.put(hal0.url + "/api/chat", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "OPTIONS, POST"
    assert isinstance(r.json()["error"], str)


# --- keep_alive: models on demand -------------------------------------------------------------


def test_an_empty_request_on_a_plain_slot_is_accepted_and_says_it_did_nothing(client, hal0):
    r = httpx.post(
        hal0.url + "/api/chat",
        json={"model": "gemma3", "messages": [], "keep_alive": 0},
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["done"] is True
    assert "done_reason" not in r.json()  # nothing was unloaded: it does not say so
    assert r.headers["x-hal0-keep-alive"].startswith("ignored")
    loaded = client.generate(model="gemma3")  # no prompt: a load (the model is served)
    assert loaded.done and loaded.done_reason == "load"


@pytest.fixture
def router(transactional_db: None, settings: Any) -> Iterator[Any]:
    """A llama.cpp router that loads one model at a time (tests/fake_llama_router.py), m1
    loaded; hal0web unloads a model idle for 600 s."""
    from tests.fake_llama_router import FakeRouter

    settings.HAL0_SWAP_WAIT_S = 10
    settings.HAL0_SWAP_HOLD_S = 1
    fake = FakeRouter("router", models=["m1", "m2"], models_max=1, chunks=2)
    fake.status["m1"] = "loaded"
    server = ServerThread(fake).start()
    add_slot("r", server.url + "/v1", ["m1", "m2"], unload_idle_s=600)
    yield fake
    server.stop()


def loads_of(slot: str = "r") -> dict[str, str]:
    return dict(SlotModel.objects.filter(slot__name=slot).values_list("model_id", "load_state"))


def test_keep_alive_loads_and_unloads_through_hal0webs_loader(router, hal0):
    _ready(hal0, "r")
    wait_until(lambda: Slot.objects.get(name="r").loads_models, "the slot to load models")
    wait_until(lambda: loads_of()["m1"] == "loaded", "m1 read as loaded")
    with ollama.Client(host=hal0.url, timeout=30) as c:
        loaded = c.generate(model="m2")  # no prompt: load it
        assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
        # Through hal0web's loader: the idle model made room first, then the load.
        assert router.asked == [("/models/unload", "m1"), ("/models/load", "m2")]
        wait_until(lambda: loads_of() == {"m1": "unloaded", "m2": "loaded"}, "the swap written")
        # Listed once the probe reads it loaded; its expiry once the loader wrote its use.
        wait_until(lambda: [m.model for m in c.ps().models] == ["m2"], "ps to list m2 alone")
        wait_until(lambda: c.ps().models[0].expires_at.year < 2318, "m2's last use written")
        (m2,) = c.ps().models
        left = (m2.expires_at - datetime.now(UTC)).total_seconds()
        assert 500 < left <= 600  # unload_idle_s after its load, not "never"
        unloaded = c.chat(model="m2", messages=[], keep_alive=0)
        assert unloaded.done and unloaded.done_reason == "unload"
        wait_until(lambda: loads_of()["m2"] == "unloaded", "m2 unloaded")
        assert router.unload_log[-1] == "m2"
        wait_until(lambda: c.ps().models == [], "ps to list nothing loaded")
        again = c.chat(model="m1", messages=[])  # chat's load
        assert again.done_reason == "load" and loads_of()["m1"] == "loaded"


# --- an Ollama server: passed through -----------------------------------------------------------


@pytest.fixture
def ollamas(transactional_db: None, settings: Any) -> Iterator[tuple[FakeOllama, FakeOllama]]:
    """Two Ollama servers: one for chat (slot `ol`), one for embeddings (slot `ole`)."""
    settings.HAL0_SWAP_WAIT_S = 10
    chat = FakeOllama(models=["llama3.2:1b", "gemma3:latest"], limit=2)
    emb = FakeOllama(name="ollama-emb", models=["nomic-embed-text:latest"])
    servers = [ServerThread(f).start() for f in (chat, emb)]
    add_slot("ol", servers[0].url + "/v1", chat.models, kind="ollama")
    add_slot("ole", servers[1].url + "/v1", emb.models, kind="ollama", type="embedding")
    yield chat, emb
    for server in servers:
        server.stop()


@pytest.fixture
def via_ollama(ollamas, hal0) -> Iterator[ollama.Client]:
    _ready(hal0, "ol", "ole")
    wait_until(lambda: Slot.objects.get(name="ol").loads_models, "ol to load models")
    c = ollama.Client(host=hal0.url, timeout=30)
    yield c
    c.close()


def test_an_ollama_server_is_sent_its_own_api_as_it_came(via_ollama, ollamas, hal0):
    fake, _ = ollamas
    messages = [{"role": "user", "content": "hi"}]
    r = via_ollama.chat(model="llama3.2:1b", messages=messages, stream=False, keep_alive="10m")
    assert r.message.content == "hello from ollama" and r.eval_count == 3
    (seen,) = _seen(fake, "/api/chat")
    assert seen.json == {
        "model": "llama3.2:1b",
        "messages": messages,
        "stream": False,
        "keep_alive": "10m",
        "tools": [],  # the client sends an empty list
    }
    parts = list(via_ollama.chat(model="gemma3", messages=messages, stream=True))
    assert "".join(p.message.content for p in parts) == "hello from ollama 1 2"
    assert parts[-1].done and parts[-1].prompt_eval_count == 11
    assert _seen(fake, "/api/chat")[-1].json["model"] == "gemma3:latest"  # its own name
    with httpx.stream("POST", hal0.url + "/api/chat", json={"model": "gemma3", "messages": messages}, timeout=30) as s:  # fmt: skip
        assert s.headers["x-hal0-mode"] == "passthrough" and s.headers["x-hal0-slot"] == "ol"
        assert s.headers["content-type"] == "application/x-ndjson"
        assert json.loads(list(s.iter_lines())[-1])["done"] is True


def _seen(fake: FakeOllama, path: str) -> list[Any]:
    return [s for s in fake.requests if s.path == path]


def test_an_ollama_servers_error_passes_as_it_said_it(via_ollama, ollamas, hal0):
    r = httpx.post(
        hal0.url + "/api/chat", json={"model": "llama3.2:1b", "messages": "hi"}, timeout=30
    )
    assert r.status_code == 400 and r.headers["x-hal0-upstream-status"] == "400"
    assert r.json() == {
        "error": "json: cannot unmarshal string into Go struct field ChatRequest.messages"
        " of type []api.Message"
    }


def test_an_ollama_servers_embeddings_pass_through(via_ollama, ollamas):
    _, emb = ollamas
    r = via_ollama.embed(model="nomic-embed-text", input=["a", "bb"])
    assert [list(v) for v in r.embeddings] == [[0.5, 1.0], [0.5, 2.0]]
    assert _seen(emb, "/api/embed")[-1].json["model"] == "nomic-embed-text:latest"
    assert list(via_ollama.embeddings(model="nomic-embed-text", prompt="abc").embedding) == [
        0.5,
        3.0,
    ]


def test_an_ollama_servers_models_load_and_unload_through_hal0web(via_ollama, ollamas):
    fake, _ = ollamas
    assert via_ollama.generate(model="gemma3").done_reason == "load"
    assert "gemma3:latest" in fake.loaded
    wait_until(lambda: loads_of("ol")["gemma3:latest"] == "loaded", "gemma3 read as loaded")
    assert "gemma3:latest" in [m.model for m in via_ollama.ps().models]
    assert {m.model for m in via_ollama.list().models} >= {"llama3.2:1b", "gemma3:latest"}
    unloaded = via_ollama.generate(model="gemma3:latest", keep_alive=0)
    assert unloaded.done_reason == "unload"
    wait_until(lambda: "gemma3:latest" not in fake.loaded, "the Ollama server to unload it")
    wait_until(lambda: loads_of("ol")["gemma3:latest"] == "unloaded", "gemma3 read as unloaded")


def test_a_translated_request_that_waited_for_its_model_says_how_long(router, hal0):
    _ready(hal0, "r")
    wait_until(lambda: loads_of()["m1"] == "loaded", "m1 read as loaded")
    bad = httpx.post(
        hal0.url + "/api/chat",
        json={"model": "m2", "messages": [{"role": "user", "content": ["x"]}]},
        timeout=30,
    )
    # Refused before any load: the request could never have been sent.
    assert bad.status_code == 400 and router.asked == []
    with ollama.Client(host=hal0.url, timeout=30) as c:
        r = c.chat(model="m2", messages=[{"role": "user", "content": "hi"}], stream=False)
    assert r.message.content and router.load_log == ["m2"]
    assert 0 < r.load_duration <= r.total_duration
