"""The Ollama <-> OpenAI translation, pure: what each Ollama request is sent as, and how an
OpenAI answer or stream comes back in Ollama's shapes, whatever the chunks' cuts; fuzzed
bodies and answers meet a 400 or a ValueError (the client's 502), never anything else."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.wire import adapters
from dispatch.wire.adapters import ClientRequest, Outgoing
from dispatch.wire.errors import ApiError
from dispatch.wire.translators import ollama_from_openai as back
from tests.ollama_bodies import JSON, OLLAMA_BODY

CHAT_OFFERS = frozenset({"chat/completions", "completions"})


class _Body:
    def __init__(self, data: Any) -> None:
        self.data = data

    def json(self) -> Any:
        return self.data

    def for_model(self, upstream_model: str | None) -> bytes:
        return json.dumps(self.data).encode()


def out(called: str, data: Any, offers: frozenset[str] = CHAT_OFFERS) -> Outgoing:
    request = ClientRequest("/" + called, "", _Body(data))
    return adapters.outgoing(called, offers, request, "up-model")


def sent(outgoing: Outgoing) -> dict[str, Any]:
    return orjson.loads(outgoing.body)


def test_the_adapters_are_registered_for_the_endpoints_a_slot_offers():
    assert adapters.translated_to("api/chat", {"chat/completions"}) == "chat/completions"
    assert adapters.translated_to("api/generate", {"completions"}) == "completions"
    assert adapters.translated_to("api/embed", {"embeddings"}) == "embeddings"
    assert adapters.translated_to("api/embeddings", {"embeddings"}) == "embeddings"
    assert not adapters.serves("api/chat", {"embeddings", "rerank"})
    # An Ollama server offers them itself: sent as it came, from its root.
    request = ClientRequest("/api/chat", "", _Body({"model": "m"}))
    assert adapters.outgoing("api/chat", {"api/chat"}, request, "m").path == "/api/chat"


def test_chat_is_sent_as_a_chat_completion_streamed_unless_told_not_to():
    o = out("api/chat", {"model": "gemma3", "messages": [{"role": "user", "content": "hi"}]})
    assert o.path == "chat/completions" and o.mode == "translated"
    body = sent(o)
    assert body == {
        "model": "up-model",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    assert o.translation is not None and o.translation.stream_type == "application/x-ndjson"
    assert sent(out("api/chat", {"model": "m", "stream": False, "messages": []}))["stream"] is False
    assert sent(out("api/chat", {"model": "m", "stream": None}))["stream"] is True


def test_history_with_tool_calls_and_results_becomes_openais():
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "both?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "a", "arguments": {"x": 1}}},
                {"id": "given", "function": {"name": "b", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "B", "tool_name": "b"},
        {"role": "tool", "content": "A", "tool_name": "a"},
    ]
    body = sent(out("api/chat", {"model": "m", "messages": messages}))
    calls = body["messages"][2]["tool_calls"]
    assert [c["function"]["arguments"] for c in calls] == ['{"x":1}', "{}"]
    assert calls[1]["id"] == "given" and calls[0]["id"]
    assert body["messages"][3]["tool_call_id"] == "given"
    assert body["messages"][4]["tool_call_id"] == calls[0]["id"]


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": 3}]}, "content"),
        ({"messages": [{"role": "user", "images": ["%%%"]}]}, "images"),
        ({"messages": [{"role": "system", "content": "x", "images": ["iVBO"]}]}, "images"),
        ({"options": {"temperature": "hot"}}, "temperature"),
        ({"options": {"top_k": 2.5}}, "top_k"),
        ({"options": []}, "options"),
        ({"format": "xml"}, "format"),
        ({"think": "very"}, "think"),
        ({"keep_alive": [1]}, "keep_alive"),
        ({"tools": [{"function": {}}]}, "tools"),
    ],
)
def test_what_ollama_would_refuse_is_a_400_naming_the_field(data, where):
    with pytest.raises(ApiError) as err:
        out("api/chat", {"model": "m", "messages": [], **data})
    assert err.value.status == 400 and where in err.value.message


def test_generate_goes_to_chat_or_completions_by_what_it_asks_and_the_slot_offers():
    plain = out("api/generate", {"model": "m", "prompt": "hi", "system": "s"})
    assert plain.path == "chat/completions"
    assert sent(plain)["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
    ]
    raw = out("api/generate", {"model": "m", "prompt": "<s>hi", "raw": True, "think": True})
    assert raw.path == "completions" and sent(raw)["prompt"] == "<s>hi"
    assert "chat_template_kwargs" not in sent(raw)
    infill = out("api/generate", {"model": "m", "prompt": "a", "suffix": "b"})
    assert infill.path == "completions" and sent(infill)["suffix"] == "b"
    chat_only = frozenset({"chat/completions"})
    assert out("api/generate", {"model": "m", "prompt": "x", "raw": True}, chat_only).path == (
        "chat/completions"
    )
    with pytest.raises(ApiError):
        out("api/generate", {"model": "m", "prompt": "a", "suffix": "b"}, chat_only)
    text_only = frozenset({"completions"})
    assert out("api/generate", {"model": "m", "prompt": "x"}, text_only).path == "completions"


def test_embed_and_embeddings_are_sent_as_embeddings():
    emb = frozenset({"embeddings"})
    assert sent(out("api/embed", {"model": "m", "input": ["a", "b"], "dimensions": 8}, emb)) == {
        "model": "up-model",
        "input": ["a", "b"],
        "dimensions": 8,
    }
    assert sent(out("api/embeddings", {"model": "m", "prompt": "a"}, emb))["input"] == "a"
    with pytest.raises(ApiError):
        out("api/embed", {"model": "m", "input": [1, 2]}, emb)


# --- the way back -----------------------------------------------------------------------------


def _event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({"choices": [choice], **extra}).encode() + b"\n\n"


STREAM = b"".join(
    [
        b": a comment\n\n",
        _event({"role": "assistant", "content": None}),
        _event({"reasoning_content": "hmm"}),
        _event({"content": "Hel"}),
        _event({"content": "lo"}),
        _event(
            {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]}
        ),
        _event({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
        _event({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
        _event({}, "tool_calls"),
        b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}\n\n',
        b"data: [DONE]\n\n",
    ]
)
# What a line says, less what differs from run to run (the clock).
_CLOCK = ("created_at", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def _lines(data: bytes) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in data.split(b"\n") if line]
    return [{k: v for k, v in line.items() if k not in _CLOCK} for line in lines]


def _streamed(cuts: list[int]) -> bytes:
    answer = back.Answer("gemma3", "message", "chat")
    chunks, at = [], 0
    for cut in [*sorted(cuts), len(STREAM)]:
        chunks.append(answer.stream(STREAM[at:cut]))
        at = cut
    return b"".join(chunks) + answer.end()


def test_a_stream_becomes_ollamas_lines_with_the_call_whole_and_the_counts_last():
    lines = _lines(_streamed([]))
    assert lines == [
        {
            "model": "gemma3",
            "message": {"role": "assistant", "content": "", "thinking": "hmm"},
            "done": False,
        },
        {"model": "gemma3", "message": {"role": "assistant", "content": "Hel"}, "done": False},
        {"model": "gemma3", "message": {"role": "assistant", "content": "lo"}, "done": False},
        {
            "model": "gemma3",
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "function": {"index": 0, "name": "f", "arguments": {"a": 1}}}
                ],
            },
            "done": False,
        },
        {
            "model": "gemma3",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 7,
            "eval_count": 5,
        },
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_the_lines_are_the_same_wherever_the_chunks_are_cut(cuts):
    assert _lines(_streamed(cuts)) == _lines(_streamed([]))


def test_streamed_calls_without_an_index_are_told_apart_by_their_ids():
    answer = back.Answer("m", "message", "chat")
    pieces = [
        {"id": "a", "function": {"name": "f", "arguments": '{"x"'}},
        {"function": {"arguments": ": 1}"}},
        {"id": "b", "function": {"name": "g", "arguments": "{}"}},
    ]
    said = answer.stream(b"".join(_event({"tool_calls": [p]}) for p in pieces))
    said += answer.stream(_event({}, "tool_calls") + b"data: [DONE]\n\n")
    calls = _lines(said)[0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["arguments"]) for c in calls] == [("a", {"x": 1}), ("b", {})]


def test_an_error_event_is_ollamas_error_line_and_ends_it():
    answer = back.Answer("m", "response", "chat")
    said = answer.stream(_event({"content": "a"}) + b'data: {"error": {"message": "boom"}}\n\n')
    assert _lines(said)[-1] == {"error": "boom"}
    assert answer.stream(_event({"content": "late"})) == b"" and answer.end() == b""


def test_a_stream_cut_inside_an_event_is_not_taken_for_whole():
    answer = back.Answer("m", "message", "chat")
    answer.stream(_event({"content": "a"})[:-5])
    with pytest.raises(ValueError, match="middle of an event"):
        answer.end()


def test_a_whole_answer_with_a_tool_call_whose_arguments_are_no_object_is_refused():
    answer = back.Answer("m", "message", "chat")
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
    body = {"choices": [{"message": {"role": "assistant", "tool_calls": [call]}}]}
    with pytest.raises(ValueError, match="not a JSON object"):
        answer.answer(json.dumps(body).encode())


def test_load_duration_is_the_wait_for_the_model():
    answer = back.Answer("m", "response", "text")
    answer.load_s = 1.5
    body = {"choices": [{"text": "x", "finish_reason": "length"}], "usage": {"prompt_tokens": 2}}
    said = json.loads(answer.answer(json.dumps(body).encode()))
    assert said["load_duration"] == 1_500_000_000 and said["done_reason"] == "length"
    assert said["response"] == "x" and said["prompt_eval_count"] == 2 and "eval_count" not in said


# --- fuzzed: a 400 or a ValueError, nothing else ------------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    called=st.sampled_from(["api/chat", "api/generate", "api/embed", "api/embeddings"]),
    data=OLLAMA_BODY,
    offers=st.sampled_from(
        [
            CHAT_OFFERS,
            frozenset({"chat/completions"}),
            frozenset({"completions"}),
            frozenset({"embeddings"}),
        ]
    ),
)
def test_fuzzed_bodies_are_translated_or_refused_with_a_400(called, data, offers):
    if not adapters.serves(called, offers):
        return
    try:
        o = out(called, data, offers)
    except ApiError as err:
        assert err.status == 400 and err.message
        return
    assert isinstance(sent(o), dict) and o.translation is not None


ANSWERS = st.one_of(
    st.binary(max_size=60),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "choices": st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={"message": JSON, "delta": JSON, "text": JSON, "finish_reason": JSON},
                ),
                max_size=2,
            )
            | JSON
        },
        optional={"usage": JSON, "timings": JSON, "data": JSON},
    ).map(lambda v: json.dumps(v).encode()),
)


@FUZZ
@given(kind=st.sampled_from(["chat", "text", "embed"]), content=ANSWERS)
def test_fuzzed_answers_are_translated_or_a_value_error(kind, content):
    translation = back.Embeddings("m") if kind == "embed" else back.Answer("m", "message", kind)
    try:
        said = translation.answer(content)
    except ValueError:
        return
    assert isinstance(json.loads(said), dict)


@FUZZ
@given(
    kind=st.sampled_from(["chat", "text"]),
    events=st.lists(
        ANSWERS.map(lambda b: b"data: " + b.replace(b"\n", b" ") + b"\n\n")
        | st.binary(max_size=30),
        max_size=5,
    ),
)
def test_fuzzed_streams_are_lines_or_a_value_error(kind, events):
    translation = back.Answer("m", "message", kind)
    try:
        said = b"".join(translation.stream(e) for e in events) + translation.end()
    except ValueError:
        return
    for line in said.split(b"\n"):
        if line:
            assert isinstance(json.loads(line), dict)


# --- who speaks it natively, what a model can do ----------------------------------------------


def test_only_an_ollama_server_speaks_ollamas_api_natively():
    from dispatch import kinds
    from dispatch.routing.endpoints import DEFAULT_ENDPOINTS

    ollama_api = {"api/chat", "api/generate", "api/embed", "api/embeddings"}
    assert not ollama_api & set().union(*DEFAULT_ENDPOINTS.values())  # no type's default
    assert kinds.get("ollama").speaks("llm") >= {"api/chat", "api/generate", "chat/completions"}
    assert kinds.get("ollama").speaks("embedding") == {"embeddings", "api/embed", "api/embeddings"}
    for name in ("llamacpp", "lemonade", "vllm", "flm", "openai"):
        assert not kinds.get(name).speaks("llm") & ollama_api, name


def test_capabilities_are_what_the_slots_serve_and_what_the_listing_tells():
    from dispatch.api.ollama_models import capabilities, context_length, details
    from dispatch.routing.table import make_slot

    chat = make_slot("c", "http://c/v1")
    emb = make_slot("e", "http://e/v1", type="embedding")
    lemonade = {"labels": ["vision", "reasoning", "tool-calling"], "checkpoint": "x:Q4_K_M"}
    assert capabilities([chat], lemonade) == ["completion", "tools", "vision", "thinking"]
    assert capabilities([emb], {"capabilities": ["completion"]}) == ["embedding"]
    assert capabilities([chat], {"capabilities": ["completion", "multimodal"]}) == [
        "completion",
        "tools",
        "vision",
    ]
    assert details("gemma-3-4b-it-Q4_K_M", {})["quantization_level"] == "Q4_K_M"
    assert details("m", lemonade)["quantization_level"] == "Q4_K_M"
    assert details("m", {"meta": {"n_params": 270_000_000}})["parameter_size"] == "270M"
    assert details("m", {}) == {
        "parent_model": "",
        "format": "",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }
    assert context_length({"max_model_len": 32768}) == 32768  # vLLM's
    assert context_length({"meta": {"n_ctx_train": 131072}, "context_length": 4096}) == 131072


def test_latest_is_let_go_or_added_as_the_table_knows_the_model():
    from dispatch.api.ollama_models import known_name
    from dispatch.routing.table import ModelEntry, RoutingTable, make_slot

    table = RoutingTable.build(
        1,
        [
            make_slot(
                "s",
                "http://s/v1",
                [
                    ModelEntry("gemma3", "gemma3", "manifest"),
                    ModelEntry("q:latest", "q:latest", "manifest"),
                ],
            )
        ],
    )
    assert known_name(table, "gemma3:latest") == "gemma3"
    assert known_name(table, "gemma3") == "gemma3"
    assert known_name(table, "q") == "q:latest" and known_name(table, "q:latest") == "q:latest"
    assert known_name(table, "s/gemma3:latest") == "s/gemma3"
    assert known_name(table, "nope:latest") == "nope:latest" and known_name(table, None) is None
