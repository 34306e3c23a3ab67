"""Each kind reads its server's words about loaded models into load states, and says how to
ask it to load or unload one: the bodies here are in the shapes the servers document (and,
for llama.cpp's router, what server-models.cpp writes)."""

from __future__ import annotations

import pytest

from dispatch import kinds
from dispatch.kinds import Call, Loads, ModelLoad
from dispatch.routing import states
from dispatch.routing.table import make_slot

LLAMA = kinds.get("llamacpp")
LEMONADE = kinds.get("lemonade")
OLLAMA = kinds.get("ollama")


# --- llama.cpp: the router --------------------------------------------------------------------


def _router_entry(model: str, status: dict) -> dict:
    """A router /models entry, as get_router_models writes it."""
    return {
        "id": model,
        "aliases": [],
        "tags": [],
        "object": "model",
        "owned_by": "llamacpp",
        "created": 1760000000,
        "status": status,
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        "source": "models_dir",
        "can_remove": False,
    }


ARGS = ["llama-server", "-ctx", "4096"]
ROUTER_LISTING = {
    "object": "list",
    "data": [
        _router_entry("gemma", {"value": "loaded", "args": ARGS}),
        _router_entry("qwen", {"value": "unloaded", "args": ARGS}),
        _router_entry("phi", {"value": "loading", "args": ARGS}),
        _router_entry("tiny", {"value": "sleeping", "args": ARGS}),
        _router_entry(
            "broken", {"value": "unloaded", "args": ARGS, "exit_code": 1, "failed": True}
        ),
        _router_entry(
            "hf/x:Q4",
            {"value": "downloading", "progress": {"https://h/x.gguf": {"done": 25, "total": 100}}},
        ),
        _router_entry("hf/y:Q4", {"value": "downloaded"}),
    ],
}
ROUTER_PROPS = {
    "role": "router",
    "max_instances": 1,
    "models_autoload": True,
    "model_alias": "llama-server",
    "model_path": "none",
}


def test_the_llama_cpp_router_listing_reads_as_each_models_load_state():
    loads = LLAMA.read_loads(ROUTER_LISTING, {"status": "ok"}, ROUTER_PROPS)
    assert loads == Loads(
        models={
            "gemma": ModelLoad(states.LOADED),
            "qwen": ModelLoad(states.UNLOADED),
            "phi": ModelLoad(states.LOAD_LOADING),
            "tiny": ModelLoad(states.SLEEPING),
            "broken": ModelLoad(states.FAILED, error="its server exited with code 1"),
            "hf/x:Q4": ModelLoad(states.LOAD_LOADING, progress=0.25),
            "hf/y:Q4": ModelLoad(states.UNLOADED),
        },
        loads_models=True,
        model_limit=1,
    )


def test_the_routers_limit_comes_from_its_props_and_nothing_else():
    def limit(props: object) -> int:
        loads = LLAMA.read_loads(ROUTER_LISTING, None, props)
        assert loads is not None
        return loads.model_limit

    assert limit(ROUTER_PROPS) == 1
    assert limit({**ROUTER_PROPS, "max_instances": 4}) == 4
    assert limit({**ROUTER_PROPS, "max_instances": 0}) == 0  # --models-max 0: unlimited
    assert limit(None) == 0  # /props not read
    assert limit({"error": {"message": "File Not Found"}}) == 0
    # A single-model server's /props: no role, no limit of its own.
    assert limit({"model_alias": "m", "is_sleeping": False, "total_slots": 1}) == 0
    assert limit({**ROUTER_PROPS, "max_instances": True}) == 0


def test_a_loading_entry_carries_its_progress_where_the_router_gives_one():
    entry = _router_entry(
        "m",
        {
            "value": "loading",
            "progress": {"stages": ["text_model", "mmproj_model"], "current": "mmproj_model"}
            | {"value": 0.5},
        },
    )
    loads = LLAMA.read_loads({"data": [entry]}, None, None)
    assert loads is not None
    assert loads.models["m"] == ModelLoad(states.LOAD_LOADING, progress=0.75)


def test_a_single_model_llama_server_says_nothing_of_loading():
    single = {
        "object": "list",
        "data": [{"id": "m.gguf", "object": "model", "owned_by": "llamacpp", "meta": {}}],
    }
    assert LLAMA.read_loads(single, {"status": "ok"}, {"model_alias": "m"}) is None
    assert LLAMA.read_loads(None, None, None) is None
    assert LLAMA.read_loads({"data": "junk"}, None, None) is None


def test_an_unknown_router_status_is_not_taken_for_servable():
    entry = _router_entry("m", {"value": "something-new"})
    loads = LLAMA.read_loads({"data": [entry, "junk", {"status": {}}]}, None, None)
    assert loads is not None
    assert loads.models == {"m": ModelLoad(states.UNLOADED)}


def _sse(model: str, event: str, data: dict | None = None) -> dict:
    """One /models/sse data line as notify_sse builds it."""
    return {"model": model, "event": event, **({"data": data} if data is not None else {})}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (_sse("m", "model_status", {"status": "loading"}), ModelLoad(states.LOAD_LOADING)),
        (
            _sse(
                "m",
                "status_change",
                {
                    "status": "loading",
                    "progress": {"stages": ["text_model"], "current": "text_model", "value": 0.4},
                },
            ),
            ModelLoad(states.LOAD_LOADING, progress=0.4),
        ),
        (
            _sse("m", "status_change", {"status": "loaded", "info": {"id": "m"}}),
            ModelLoad(states.LOADED),
        ),
        (_sse("m", "status_change", {"status": "sleeping"}), ModelLoad(states.SLEEPING)),
        (
            _sse("m", "status_change", {"status": "unloaded", "exit_code": 0}),
            ModelLoad(states.UNLOADED),
        ),
        (
            _sse("m", "status_change", {"status": "unloaded", "exit_code": 134}),
            ModelLoad(states.FAILED, error="its server exited with code 134"),
        ),
        (
            _sse("m", "download_progress", {"https://h/a.gguf": {"done": 1, "total": 4}}),
            ModelLoad(states.LOAD_LOADING, progress=0.25),
        ),
    ],
)
def test_a_pushed_model_status_reads_as_that_models_load_state(data, expected):
    # The router's SSE lines carry no `event:` field: the caller passes "" and the JSON.
    assert LLAMA.read_event("", data) == ("m", expected)


@pytest.mark.parametrize(
    ("data", "rereads"),
    [
        (_sse("*", "models_reload"), True),
        (_sse("m", "model_remove", {}), True),
        (_sse("m", "download_finished", {}), True),
        (_sse("m", "download_failed", {}), True),
        (_sse("m", "something_else", {}), False),
        ("not json", False),
        ({"event": "model_status"}, False),  # no model named
    ],
)
def test_an_event_about_the_list_asks_for_a_probe_instead(data, rereads):
    assert LLAMA.read_event("", data) is None
    assert LLAMA.event_rereads("", data) is rereads


def test_the_router_is_asked_at_its_root_and_answers_before_the_load_is_done():
    slot = make_slot("primary", "http://h:8002/v1", kind="llamacpp")
    assert LLAMA.loads_url(slot) == "http://h:8002/props"
    assert LLAMA.events_url(slot) == "http://h:8002/models/sse"
    load = LLAMA.load_call(slot, "gemma")
    unload = LLAMA.unload_call(slot, "gemma")
    assert load is not None and unload is not None
    assert (load.method, load.url, load.body) == (
        "POST",
        "http://h:8002/models/load",
        {"model": "gemma"},
    )
    assert (unload.method, unload.url, unload.body) == (
        "POST",
        "http://h:8002/models/unload",
        {"model": "gemma"},
    )
    assert LLAMA.load_call_waits is False and LLAMA.unload_call_waits is False


@pytest.mark.parametrize(
    ("status", "body", "failed"),
    [
        (200, {"success": True}, None),
        # The state asked for is (being) reached already.
        (400, {"error": {"code": 400, "message": "model is already running"}}, None),
        (400, {"error": {"code": 400, "message": "model is not running"}}, None),
        (
            404,
            {"error": {"code": 404, "message": "model is not found", "type": "not_found_error"}},
            "404: model is not found",
        ),
        (
            500,
            {"error": {"code": 500, "message": "model limit reached, try again later"}},
            "500: model limit reached, try again later",
        ),
        (None, None, "no answer"),
        (200, {"success": False}, "the server said it did not succeed"),
    ],
)
def test_the_routers_load_answers_read_as_failed_or_not(status, body, failed):
    assert LLAMA.call_failed(status, body) == failed


# --- Lemonade ---------------------------------------------------------------------------------

LEMONADE_LISTING = {
    "object": "list",
    "data": [
        {
            "id": "Qwen3-0.6B-GGUF",
            "object": "model",
            "owned_by": "lemonade",
            "checkpoint": "unsloth/Qwen3-0.6B-GGUF:Q4_0",
            "recipe": "llamacpp",
            "downloaded": True,
            "labels": ["reasoning"],
        },
        {
            "id": "Gemma-3-4b-it-GGUF",
            "object": "model",
            "owned_by": "lemonade",
            "recipe": "llamacpp",
            "downloaded": True,
        },
        {"id": "nomic-embed-text-v1-GGUF", "object": "model", "recipe": "llamacpp"},
    ],
}


def _lemonade_health(*loaded: str, llm: int = 1, **more: object) -> dict:
    return {
        "status": "ok",
        "version": "9.3.3",
        "model_loaded": loaded[-1] if loaded else None,
        "all_models_loaded": [
            {
                "model_name": m,
                "checkpoint": f"org/{m}",
                "last_use": 1732123456.789,
                "type": "llm",
                "device": "gpu",
                "pinned": False,
                "recipe": "llamacpp",
                "backend_url": "http://127.0.0.1:8001/v1",
            }
            for m in loaded
        ],
        "pinned_models": {"llm": 0, "embedding": 0},
        "max_models": {"llm": llm, "embedding": 1, "reranking": 1, "transcription": 1},
        **more,
    }


def test_lemonade_reads_loaded_models_from_its_health_and_the_rest_as_unloaded():
    loads = LEMONADE.read_loads(
        LEMONADE_LISTING, _lemonade_health("Gemma-3-4b-it-GGUF", llm=2), None
    )
    assert loads == Loads(
        models={
            "Qwen3-0.6B-GGUF": ModelLoad(states.UNLOADED),
            "Gemma-3-4b-it-GGUF": ModelLoad(states.LOADED),
            "nomic-embed-text-v1-GGUF": ModelLoad(states.UNLOADED),
        },
        loads_models=True,
        model_limit=2,
    )


def test_lemonade_with_nothing_loaded_has_every_model_unloaded():
    loads = LEMONADE.read_loads(LEMONADE_LISTING, _lemonade_health(), None)
    assert loads is not None
    assert {m.state for m in loads.models.values()} == {states.UNLOADED}
    assert loads.model_limit == 1


def test_lemonades_limit_is_its_llm_count_and_minus_one_is_none():
    def limit(health: dict) -> int:
        loads = LEMONADE.read_loads(LEMONADE_LISTING, health, None)
        assert loads is not None
        return loads.model_limit

    assert limit(_lemonade_health(llm=3)) == 3
    assert limit(_lemonade_health(llm=-1)) == 0  # max_loaded_models -1: unlimited
    assert limit({"status": "ok", "model_loaded": None}) == 0  # an older server: not said
    assert limit({**_lemonade_health(), "max_models": 2}) == 0  # not the documented shape


def test_an_older_lemonade_says_its_one_model_in_model_loaded():
    loads = LEMONADE.read_loads(
        LEMONADE_LISTING, {"status": "ok", "model_loaded": "Qwen3-0.6B-GGUF"}, None
    )
    assert loads is not None
    assert loads.models["Qwen3-0.6B-GGUF"] == ModelLoad(states.LOADED)
    assert loads.models["Gemma-3-4b-it-GGUF"] == ModelLoad(states.UNLOADED)


def test_a_model_lemonade_has_loaded_but_does_not_list_is_still_said_loaded():
    loads = LEMONADE.read_loads({"data": []}, _lemonade_health("Other-GGUF"), None)
    assert loads is not None and loads.models == {"Other-GGUF": ModelLoad(states.LOADED)}


def test_lemonade_without_a_health_answer_says_nothing_of_loading():
    assert LEMONADE.read_loads(LEMONADE_LISTING, None, None) is None


def test_an_idle_lemonade_is_ready_not_loading():
    # Up with no model loaded: the slot answers; its models' load states say none is loaded.
    idle = {"status": "ok", "model_loaded": None, "all_models_loaded": []}
    assert LEMONADE.classify(200, idle, 200) == states.READY


def test_lemonade_is_asked_under_its_api_root_and_answers_once_done():
    slot = make_slot("lem", "http://h:13305/api/v1/", kind="lemonade")
    assert LEMONADE.loads_url(slot) is None  # its health says it
    assert LEMONADE.events_url(slot) is None
    assert LEMONADE.load_call(slot, "Qwen3-0.6B-GGUF") == Call(
        "POST", "http://h:13305/api/v1/load", {"model_name": "Qwen3-0.6B-GGUF"}
    )
    assert LEMONADE.unload_call(slot, "Qwen3-0.6B-GGUF") == Call(
        "POST", "http://h:13305/api/v1/unload", {"model_name": "Qwen3-0.6B-GGUF"}
    )
    assert LEMONADE.load_call_waits is True and LEMONADE.unload_call_waits is True


@pytest.mark.parametrize(
    ("status", "body", "failed"),
    [
        (
            200,
            {"status": "success", "model_name": "m", "checkpoint": "o/m", "recipe": "llamacpp"},
            None,
        ),
        (200, {"status": "success", "message": "Model unloaded successfully"}, None),
        (200, {"status": "error", "message": "Model not found: m"}, "Model not found: m"),
        (
            500,
            {
                "error": {
                    "message": "Failed to load model 'm': llama-server exited",
                    "type": "model_load_error",
                    "param": "model",
                    "code": "model_load_error",
                    "requested_model": "m",
                }
            },
            "500: Failed to load model 'm': llama-server exited",
        ),
        (404, {"error": "Model not loaded: m"}, None),  # unloaded already
        (500, {"error": "Model not loaded: m"}, "500: Model not loaded: m"),
        (404, {"status": "error", "message": "Model not found: m"}, "404: Model not found: m"),
        (None, None, "no answer"),
    ],
)
def test_lemonades_answers_read_as_failed_or_not(status, body, failed):
    assert LEMONADE.call_failed(status, body) == failed


# --- Ollama -----------------------------------------------------------------------------------

OLLAMA_LISTING = {
    "object": "list",
    "data": [
        {"id": "llama3.2:1b", "object": "model", "created": 1718000000, "owned_by": "library"},
        {"id": "gemma3:latest", "object": "model", "created": 1718000000, "owned_by": "library"},
        {"id": "qwen3:0.6b", "object": "model", "created": 1718000000, "owned_by": "library"},
    ],
}


def _ps(*names: str) -> dict:
    return {
        "models": [
            {
                "name": n,
                "model": n,
                "size": 6591830464,
                "digest": "a2af6cc3eb7f",
                "details": {"format": "gguf", "family": "gemma3", "parameter_size": "4.3B"},
                "expires_at": "2025-10-17T16:47:07.93355-07:00",
                "size_vram": 5333539264,
                "context_length": 4096,
            }
            for n in names
        ]
    }


def test_ollama_reads_what_api_ps_lists_as_loaded_and_the_rest_as_unloaded():
    loads = OLLAMA.read_loads(OLLAMA_LISTING, None, _ps("gemma3:latest"))
    assert loads == Loads(
        models={
            "llama3.2:1b": ModelLoad(states.UNLOADED),
            "gemma3:latest": ModelLoad(states.LOADED),
            "qwen3:0.6b": ModelLoad(states.UNLOADED),
        },
        loads_models=True,
        model_limit=0,  # OLLAMA_MAX_LOADED_MODELS is not reported
    )
    empty = OLLAMA.read_loads(OLLAMA_LISTING, None, {"models": []})
    assert empty is not None
    assert {m.state for m in empty.models.values()} == {states.UNLOADED}


def test_ollama_without_an_api_ps_answer_says_nothing_of_loading():
    assert OLLAMA.read_loads(OLLAMA_LISTING, None, None) is None
    assert OLLAMA.read_loads(OLLAMA_LISTING, None, {"error": "boom"}) is None


def test_ollama_is_asked_through_generate_at_its_root():
    slot = make_slot("oll", "http://h:11434/v1", kind="ollama")
    assert OLLAMA.loads_url(slot) == "http://h:11434/api/ps"
    assert OLLAMA.events_url(slot) is None
    load = OLLAMA.load_call(slot, "gemma3:latest")
    unload = OLLAMA.unload_call(slot, "gemma3:latest")
    assert load is not None and unload is not None
    assert (load.method, load.url) == ("POST", "http://h:11434/api/generate")
    assert load.body == {"model": "gemma3:latest", "stream": False}  # no prompt: a load
    assert unload.body == {"model": "gemma3:latest", "keep_alive": 0, "stream": False}
    assert OLLAMA.load_call_waits is True  # answers once the model is in memory
    assert OLLAMA.unload_call_waits is False  # answers once its scheduler is told
    # A slot that unloads idle models itself keeps Ollama from dropping them before then.
    idle = make_slot("oll", "http://h:11434/v1", kind="ollama", unload_idle_s=900.0)
    kept = OLLAMA.load_call(idle, "gemma3:latest")
    assert kept is not None and kept.body == {
        "model": "gemma3:latest",
        "stream": False,
        "keep_alive": -1,
    }


@pytest.mark.parametrize(
    ("status", "body", "failed"),
    [
        (
            200,
            {"model": "m", "created_at": "2024-01-01T00:00:00Z", "response": "", "done": True},
            None,
        ),
        (200, {"model": "m", "response": "", "done": True, "done_reason": "unload"}, None),
        (404, {"error": "model 'm' not found"}, "404: model 'm' not found"),
        (
            500,
            {"error": "llama runner process has terminated: exit status 2"},
            "500: llama runner process has terminated: exit status 2",
        ),
    ],
)
def test_ollamas_answers_read_as_failed_or_not(status, body, failed):
    assert OLLAMA.call_failed(status, body) == failed


# --- the rest: what they list is loaded -------------------------------------------------------


@pytest.mark.parametrize("name", ["vllm", "flm", "openai"])
def test_the_other_kinds_say_nothing_of_loading(name):
    kind = kinds.get(name)
    slot = make_slot("s", "http://h/v1", kind=name)
    assert kind.read_loads(OLLAMA_LISTING, {"status": "ok"}, None) is None
    assert kind.loads_url(slot) is None and kind.events_url(slot) is None
    assert kind.load_call(slot, "m") is None and kind.unload_call(slot, "m") is None
    assert kind.read_event("model_status", {"model": "m"}) is None
    assert kind.event_rereads("", {}) is False
    assert kind.event_rereads("reload", {}) is True  # a named event it does not read
