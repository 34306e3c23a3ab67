"""Fuzzed Responses API bodies through the Responses -> chat translation: the adapter alone
(a chat body, or an ApiError a client can read, nothing else), the way back (only ValueError
for what no chat server sends), and through hal0web to a chat-only slot (never a 500)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dispatch.wire.adapters import ClientRequest
from dispatch.wire.errors import ApiError
from dispatch.wire.framing import EventReader
from dispatch.wire.translators.responses_back import FromChat
from dispatch.wire.translators.responses_chat import to_chat
from tests.conftest import add_slot
from tests.fake_chat_agent import ChatAgent
from tests.fakes import FakeUpstream, ServerThread

TEXT = st.text(max_size=12)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
ODD = JSON_VALUES  # anything a client might put where something else belongs


def _or_odd(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly what belongs there, now and then anything: most bodies get all the way."""
    return st.one_of(*[strategy] * 20, ODD)


PART = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "input_text",
                "output_text",
                "input_image",
                "input_file",
                "refusal",
                "summary_text",
                "x",
            ]
        )
    },
    optional={
        "text": _or_odd(TEXT),
        "image_url": _or_odd(st.just("data:image/png;base64,AAAA")),
        "detail": _or_odd(st.sampled_from(["low", "high", "auto", "original"])),
        "refusal": _or_odd(TEXT),
        "file_id": TEXT,
    },
)
CONTENT = _or_odd(TEXT | st.lists(_or_odd(PART), max_size=3))
ROLE = _or_odd(st.sampled_from(["user", "assistant", "system", "developer", "tool"]))
MESSAGE = st.fixed_dictionaries(
    {"role": ROLE, "content": CONTENT},
    optional={"type": _or_odd(st.just("message")), "id": _or_odd(TEXT)},
)
ITEM = st.one_of(
    MESSAGE,
    MESSAGE,
    MESSAGE,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function_call", "custom_tool_call"])},
        optional={
            "name": _or_odd(TEXT),
            "arguments": _or_odd(st.just('{"a": 1}')),
            "input": _or_odd(TEXT),
            "call_id": _or_odd(TEXT),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["function_call_output", "custom_tool_call_output"])},
        optional={"call_id": _or_odd(TEXT), "output": CONTENT},
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["reasoning", "web_search_call", "item_reference", "compaction"])},
        optional={"id": TEXT, "summary": ODD, "content": ODD},
    ),
    ODD,
)
TOOL = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("function")},
        optional={
            "name": _or_odd(TEXT),
            "description": _or_odd(TEXT),
            "parameters": _or_odd(
                st.just({"type": "object", "properties": {"a": {"type": "string"}}})
            ),
            "strict": ODD,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["web_search", "file_search", "namespace", "custom", "mcp"])},
        optional={"name": TEXT, "tools": ODD},
    ),
    ODD,
)
FORMAT = st.fixed_dictionaries(
    {"type": _or_odd(st.sampled_from(["text", "json_object", "json_schema"]))},
    optional={
        "schema": _or_odd(st.just({"type": "object", "properties": {"x": {"type": "number"}}})),
        "name": ODD,
        "strict": ODD,
        "description": ODD,
    },
)
TOOL_CHOICE = _or_odd(
    st.sampled_from(["auto", "none", "required"])
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "allowed_tools", "web_search"])},
        optional={"name": _or_odd(TEXT), "mode": ODD, "tools": ODD},
    )
)
BODY = st.fixed_dictionaries(
    {"model": st.just("talker"), "input": _or_odd(TEXT | st.lists(ITEM, min_size=1, max_size=4))},
    optional={
        "instructions": _or_odd(TEXT | st.lists(ITEM, max_size=2)),
        "tools": _or_odd(st.lists(TOOL, max_size=3)),
        "tool_choice": TOOL_CHOICE,
        "text": _or_odd(st.fixed_dictionaries({}, optional={"format": _or_odd(FORMAT)})),
        "reasoning": _or_odd(
            st.fixed_dictionaries({}, optional={"effort": _or_odd(st.just("low")), "summary": ODD})
        ),
        "max_output_tokens": _or_odd(st.integers(1, 50)),
        "temperature": _or_odd(st.floats(0, 2)),
        "top_p": _or_odd(st.floats(0, 1)),
        "top_logprobs": _or_odd(st.integers(0, 5)),
        "parallel_tool_calls": _or_odd(st.booleans()),
        "stream": _or_odd(st.booleans()),
        "store": _or_odd(st.booleans()),
        "metadata": ODD,
        "user": _or_odd(TEXT),
        "background": st.sampled_from([False] * 9 + [True]),
        "truncation": ODD,
        "include": ODD,
    },
)

CHAT_ANSWER = orjson.dumps(
    {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "reasoning_content": "hm"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
)


class _Json:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def json(self) -> dict[str, Any]:
        return self.data

    def for_model(self, upstream_model: str | None) -> bytes:
        return orjson.dumps(self.data)


def _events(stream: bytes) -> list[dict[str, Any]]:
    reader = EventReader()
    events = [orjson.loads(data) for _, data in reader.feed(stream)]
    assert not reader.cut
    return events


@settings(max_examples=400, deadline=None)
@given(body=BODY)
def test_a_fuzzed_body_is_translated_or_refused_in_words(body):
    request = ClientRequest("/v1/responses", "", _Json(body))
    try:
        chat, asked = to_chat(request, "up")
    except ApiError as err:
        assert 400 <= err.status < 500 and err.message
        return
    sent = orjson.loads(orjson.dumps(chat))
    assert sent["messages"] and sent["model"] == "up"
    assert {m["role"] for m in sent["messages"]} <= {"system", "user", "assistant", "tool"}
    for t in sent.get("tools", []):
        assert t["type"] == "function" and isinstance(t["function"]["name"], str)
    answered = orjson.loads(FromChat(asked, "resp_hal0x").answer(CHAT_ANSWER))
    assert answered["id"] == "resp_hal0x" and answered["output"]
    back = FromChat(asked, "resp_hal0y")
    chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
    streamed = back.stream(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n") + back.end()
    events = _events(streamed)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"


CHUNK = st.fixed_dictionaries(
    {},
    optional={
        "choices": _or_odd(
            st.lists(
                st.fixed_dictionaries(
                    {"index": st.just(0)},
                    optional={
                        "delta": _or_odd(
                            st.fixed_dictionaries(
                                {},
                                optional={
                                    "content": _or_odd(TEXT),
                                    "reasoning_content": _or_odd(TEXT),
                                    "tool_calls": _or_odd(
                                        st.lists(
                                            st.fixed_dictionaries(
                                                {},
                                                optional={
                                                    "index": _or_odd(st.integers(0, 2)),
                                                    "id": _or_odd(TEXT),
                                                    "function": _or_odd(
                                                        st.fixed_dictionaries(
                                                            {},
                                                            optional={
                                                                "name": _or_odd(TEXT),
                                                                "arguments": _or_odd(TEXT),
                                                            },
                                                        )
                                                    ),
                                                },
                                            ),
                                            max_size=2,
                                        )
                                    ),
                                },
                            )
                        ),
                        "finish_reason": _or_odd(st.sampled_from(["stop", "length", "tool_calls"])),
                        "message": ODD,
                    },
                ),
                max_size=2,
            )
        ),
        "usage": ODD,
        "error": ODD,
    },
)
UPSTREAM_EVENT = st.one_of(
    CHUNK.map(lambda c: b"data: " + orjson.dumps(c) + b"\n\n"),
    st.just(b"data: [DONE]\n\n"),
    st.binary(max_size=30),
    JSON_VALUES.map(lambda v: b"data: " + orjson.dumps(v) + b"\n\n"),
)


@settings(max_examples=400, deadline=None)
@given(
    answer=st.one_of(CHUNK.map(orjson.dumps), JSON_VALUES.map(orjson.dumps), st.binary(max_size=40))
)
def test_a_fuzzed_chat_answer_is_translated_or_a_value_error(answer):
    asked = to_chat(ClientRequest("/v1/responses", "", _Json({"input": "x"})), "up")[1]
    try:
        out = FromChat(asked, "resp_hal0x").answer(answer)
    except ValueError:
        return
    assert orjson.loads(out)["object"] == "response"


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n"


def _call_piece(arguments: str, name: str | None = None) -> dict[str, Any]:
    function = {"arguments": arguments, **({"name": name} if name else {})}
    return {"tool_calls": [{"index": 0, "function": function}]}


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(UPSTREAM_EVENT, max_size=6), cut=st.integers(0, 7))
# A call's arguments after text closed the call: a new item, never a delta for a done one.
@example(
    chunks=[
        _chunk(_call_piece('{"a"', "f")),
        _chunk({"content": "meanwhile"}),
        _chunk(_call_piece(": 1}"), "tool_calls"),
    ],
    cut=0,
)
def test_a_fuzzed_chat_stream_is_translated_event_by_event_or_a_value_error(chunks, cut):
    asked = to_chat(
        ClientRequest("/v1/responses", "", _Json({"input": "x", "stream": True})), "up"
    )[1]
    back = FromChat(asked, "resp_hal0x")
    whole = b"".join(chunks)
    out = b""
    try:
        for piece in (whole[:cut], whole[cut:]):  # an event may be cut between chunks
            out += back.stream(piece)
        out += back.end()
    except ValueError:
        return
    events = _events(out)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in ("response.completed", "response.failed")
    added = {e["output_index"] for e in events if e["type"] == "response.output_item.added"}
    done = {e["output_index"] for e in events if e["type"] == "response.output_item.done"}
    if events[-1]["type"] == "response.completed":
        assert added == done == set(range(len(events[-1]["response"]["output"])))
        # The Response says of each item what its output_item.done said.
        items = {e["output_index"]: e["item"] for e in events if e["type"].endswith("item.done")}
        assert [items[i] for i in sorted(items)] == events[-1]["response"]["output"]
        # No event about an item after its output_item.done.
        closed: set[int] = set()
        for e in events:
            assert e.get("output_index") not in closed, e
            if e["type"] == "response.output_item.done":
                closed.add(e["output_index"])


# --- through hal0web ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_server() -> Iterator[str]:
    agent = ChatAgent(FakeUpstream("chatty", models=["talker"]))
    thread = ServerThread(agent).start()
    yield thread.url
    thread.stop()


@pytest.fixture
def client(chat_server, transactional_db, hal0) -> Iterator[httpx.Client]:
    add_slot("chatty", chat_server + "/v1", ["talker"], endpoints=["chat/completions"])
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        yield c


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODY)
def test_fuzzed_responses_bodies_through_hal0web_never_get_a_500(client, body):
    r = client.post("/v1/responses", content=json.dumps(body))
    assert r.status_code != 500, r.text
    kind = r.headers.get("content-type", "")
    if r.status_code == 200 and kind.startswith("text/event-stream"):
        events = _events(r.content)
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["type"] == "response.completed"
        return
    assert kind.startswith("application/json"), (r.status_code, kind, r.text[:300])
    data = r.json()
    if r.status_code >= 400:
        assert set(data["error"]) >= {"message", "type", "param", "code"}, data
    else:
        assert data["object"] == "response" and data["id"].startswith("resp_hal0")
