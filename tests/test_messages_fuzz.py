"""Fuzzed Anthropic Messages bodies through the Messages → Chat translation: the adapter
either sends a chat completion or refuses the body with a 400 in Anthropic's shape, never
anything else; the way back takes any answer or stream a server could send, in any cuts,
raising nothing but ValueError (the relay's 502) and sending only whole Anthropic events;
through hal0web, never a 500."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.models import Slot
from dispatch.routing.states import READY
from dispatch.wire.adapters import ClientRequest, Outgoing
from dispatch.wire.errors import ApiError
from dispatch.wire.translators.messages_chat import MessagesFromChat, TokenCount, adapt
from tests.conftest import add_slot
from tests.fake_chat import ChatUpstream
from tests.fakes import ServerThread
from tests.polling import wait_until

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
TEXT = st.text(max_size=12)
CACHE = st.just({"type": "ephemeral"})


def _either(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly what the API documents, sometimes anything at all."""
    return st.sampled_from([good] * 4 + [JSON_VALUES]).flatmap(lambda s: s)


SOURCE = _either(
    st.fixed_dictionaries(
        {"type": st.just("base64"), "media_type": st.just("image/png"), "data": TEXT}
    )
    | st.fixed_dictionaries({"type": st.just("url"), "url": TEXT})
)
BLOCK = _either(
    st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("text"), "text": _either(TEXT)}, optional={"cache_control": CACHE}
        ),
        st.fixed_dictionaries({"type": st.just("image"), "source": SOURCE}),
        st.fixed_dictionaries(
            {"type": st.just("document"), "source": _either(st.just({"type": "text", "data": "d"}))}
        ),
        st.fixed_dictionaries(
            {"type": st.just("tool_use"), "id": _either(TEXT), "name": _either(TEXT)},
            optional={"input": JSON_VALUES},
        ),
        st.fixed_dictionaries(
            {"type": st.just("tool_result"), "tool_use_id": _either(TEXT)},
            optional={"content": _either(TEXT), "is_error": JSON_VALUES},
        ),
        st.fixed_dictionaries({"type": st.just("thinking"), "thinking": TEXT, "signature": TEXT}),
        st.fixed_dictionaries({"type": TEXT}),
    )
)
CONTENT = _either(TEXT | st.lists(BLOCK, max_size=4))
MESSAGE = _either(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "user", "system", "tool"]),
            "content": CONTENT,
        }
    )
)
TOOL = _either(
    st.fixed_dictionaries(
        {"name": _either(TEXT)},
        optional={
            "description": TEXT,
            "input_schema": _either(st.just({"type": "object", "properties": {}})),
            "cache_control": CACHE,
            "type": st.sampled_from(["custom", "web_search_20250305", "bash_20250124"]),
        },
    )
)
TOOL_CHOICE = _either(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["auto", "any", "none", "tool", "other"])},
        optional={"name": TEXT, "disable_parallel_tool_use": st.booleans()},
    )
)
DOCUMENTED = st.fixed_dictionaries(
    {"model": st.just("local"), "messages": _either(st.lists(MESSAGE, max_size=5))},
    optional={
        "system": _either(TEXT | st.lists(BLOCK, max_size=3)),
        "max_tokens": _either(st.integers(1, 4096)),
        "stop_sequences": _either(st.lists(TEXT, max_size=3)),
        "temperature": _either(st.floats(0, 1)),
        "top_k": _either(st.integers(1, 100)),
        "tools": _either(st.lists(TOOL, max_size=3)),
        "tool_choice": TOOL_CHOICE,
        "thinking": _either(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["enabled", "adaptive", "disabled", "odd"])},
                optional={"budget_tokens": st.integers()},
            )
        ),
        "metadata": _either(st.fixed_dictionaries({}, optional={"user_id": TEXT})),
        "stream": st.booleans(),
        "cache_control": CACHE,
        "context_management": JSON_VALUES,
    },
)
# And fields no one documents (betas to come): dropped.
BODY = st.tuples(DOCUMENTED, st.dictionaries(TEXT, JSON_VALUES, max_size=2)).map(
    lambda both: {**both[1], **both[0]}
)
# What a chat completion request may carry, as the translation writes it.
CHAT_FIELDS = {
    "model", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "user",
    "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "stream",
    "stream_options",
}  # fmt: skip
PATHS = st.sampled_from(["/v1/messages", "/v1/messages", "/v1/messages/count_tokens"])


class _Body:
    def __init__(self, data: Any) -> None:
        self.data = data

    def json(self) -> Any:
        return self.data

    def for_model(self, upstream_model: str | None) -> bytes:
        return json.dumps(self.data).encode()


@settings(max_examples=400, deadline=None)
@given(body=BODY | JSON_VALUES, path=PATHS)
def test_the_adapter_sends_a_chat_completion_or_refuses_with_a_400(body, path):
    try:
        sent = adapt(ClientRequest(path, "", _Body(body)), "up")
    except ApiError as err:
        assert err.status == 400 and err.code == "invalid_request_error"
        assert err.message
        return
    assert isinstance(sent, Outgoing) and sent.translation is not None
    chat = orjson.loads(sent.body)
    if path.endswith("count_tokens"):
        assert sent.path == "/tokenize" and isinstance(chat["content"], str)
        return
    assert sent.path == "chat/completions" and chat["model"] == "up"
    assert set(chat) <= CHAT_FIELDS
    for message in chat["messages"]:
        assert message["role"] in ("system", "user", "assistant", "tool")
        assert isinstance(message["content"], str | list)
    assert "cache_control" not in _keys(chat["messages"])
    for tool in chat.get("tools", ()):
        assert set(tool["function"]) <= {"name", "description", "parameters"}


def _keys(value: Any) -> set[str]:
    """Every key of every object in ``value``."""
    if isinstance(value, dict):
        return set(value).union(*map(_keys, value.values()))
    if isinstance(value, list):
        return set().union(*map(_keys, value))
    return set()


# --- the way back --------------------------------------------------------------------------

DELTA = _either(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.just("assistant"),
            "content": _either(TEXT) | st.none(),
            "reasoning_content": TEXT,
            "tool_calls": _either(
                st.lists(
                    st.fixed_dictionaries(
                        {"index": _either(st.integers(0, 2))},
                        optional={
                            "id": TEXT,
                            "function": _either(
                                st.fixed_dictionaries(
                                    {}, optional={"name": TEXT, "arguments": TEXT}
                                )
                            ),
                        },
                    ),
                    max_size=2,
                )
            ),
        },
    )
)
CHUNK = _either(
    st.fixed_dictionaries(
        {
            "id": TEXT,
            "choices": _either(
                st.lists(
                    st.fixed_dictionaries(
                        {"index": st.just(0), "delta": DELTA},
                        optional={"finish_reason": _either(st.sampled_from(["stop", "length"]))},
                    ),
                    max_size=1,
                )
            ),
        },
        optional={"usage": _either(st.just({"prompt_tokens": 3, "completion_tokens": 2}))},
    )
    | st.just({"error": {"message": "boom"}})
)
EVENT = _either(CHUNK).map(
    lambda c: b"data: " + json.dumps(c).encode() + b"\n\n"
) | st.sampled_from([b"data: [DONE]\n\n", b": comment\n\n", b"data: {not json\n\n", b"event: x\n"])


def _events(out: bytes) -> list[dict[str, Any]]:
    """The client's events, each whole and named as its data's type says."""
    assert not out or out.endswith(b"\n\n")
    seen = []
    for block in out.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        payload = json.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + payload["type"].encode()
        seen.append(payload)
    return seen


@settings(max_examples=400, deadline=None)
@given(
    events=st.lists(EVENT, max_size=8),
    cuts=st.lists(st.integers(1, 40), max_size=6),
    thinking=st.booleans(),
)
def test_any_stream_comes_back_as_whole_anthropic_events_or_a_value_error(events, cuts, thinking):
    translation = MessagesFromChat("local", thinking, streamed=True)
    raw = b"".join(events)
    out = b""
    try:
        at = 0
        for cut in [*cuts, len(raw)]:
            out += translation.stream(raw[at : at + cut])
            at += cut
        out += translation.stream(raw[at:])
        out += translation.end()
    except ValueError:
        pass
    seen = _events(out)
    if seen:
        assert seen[0]["type"] == "message_start" and seen[1]["type"] == "ping"
    starts = [e["index"] for e in seen if e["type"] == "content_block_start"]
    assert starts == list(range(len(starts)))  # one index per block, in order


@settings(max_examples=300, deadline=None)
@given(answer=JSON_VALUES | CHUNK, streamed=st.booleans())
def test_any_answer_comes_back_as_a_message_or_a_value_error(answer, streamed):
    translation = MessagesFromChat("local", True, streamed=streamed)
    try:
        out = translation.answer(json.dumps(answer).encode())
    except ValueError:
        return
    if streamed:
        assert _events(out)[-1]["type"] == "message_stop"
    else:
        assert json.loads(out)["type"] == "message"
    counted = TokenCount(7).answer(json.dumps(answer).encode())
    assert isinstance(json.loads(counted)["input_tokens"], int)


# --- through hal0web -----------------------------------------------------------------------


@pytest.fixture
def chat_slot(transactional_db, hal0) -> Iterator[httpx.Client]:
    fake = ChatUpstream("chatty", models=["local"], reasoning="hm")
    server = ServerThread(fake).start()
    try:
        add_slot("chatty", server.url + "/v1", ["local"], endpoints=["chat/completions"])
        wait_until(lambda: Slot.objects.get(name="chatty").state == READY, "chatty ready")
        with httpx.Client(base_url=hal0.url, timeout=10) as client:
            yield client
    finally:
        server.stop()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODY | JSON_VALUES, path=PATHS)
def test_fuzzed_messages_through_hal0web_never_get_a_500(chat_slot, body, path):
    r = chat_slot.post(path, content=json.dumps(body).encode())
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        error = r.json()
        assert error["type"] == "error", error
        assert error["error"]["type"] in ("invalid_request_error", "not_found_error"), error
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert _events(r.content)[-1]["type"] == "message_stop"
    else:
        data = r.json()
        assert data.get("type") == "message" or isinstance(data.get("input_tokens"), int)
