"""Anthropic Messages on a slot that offers only Chat Completions: the official `anthropic`
SDK through hal0web to a chat-only server (tests/fake_chat.py), every field the translation
carries, streamed and not; the answer, its stream event by event, errors in Anthropic's
shape; count_tokens by the server's tokenizer, else an estimate said to be one."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from dispatch.models import Slot
from dispatch.routing.states import LOADING, READY
from dispatch.wire.translators.messages_from_chat import MessagesFromChat
from tests.conftest import add_slot
from tests.fake_chat import ChatUpstream, ToolCall
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until

HI = [{"role": "user", "content": "hi there"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def chatty(transactional_db, hal0) -> Iterator[ChatUpstream]:
    """`chatty`, a chat-only server serving `local`; `native`, one that speaks Messages,
    serving `claude-native`."""
    chat = ChatUpstream("chatty", models=["local"])
    native = FakeUpstream("native", models=["claude-native"])
    servers = [ServerThread(chat).start(), ServerThread(native).start()]
    try:
        add_slot("chatty", servers[0].url + "/v1", ["local"], endpoints=["chat/completions"])
        add_slot("native", servers[1].url + "/v1", ["claude-native"])
        wait_until(
            lambda: all(s.state == READY for s in Slot.objects.all()), "both slots ready", 10
        )
        yield chat
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def claude(chatty, hal0) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=hal0.url, api_key="unused", max_retries=0)
    yield client
    client.close()


def sent(fake: ChatUpstream) -> dict[str, Any]:
    """The last chat completion request the server received."""
    (last, *_) = reversed(fake.seen("/v1/chat/completions"))
    return last.json


def test_text_system_and_options_become_a_chat_completion_and_come_back_a_message(claude, chatty):
    raw = claude.messages.with_raw_response.create(
        model="local",
        system="Be brief.",
        max_tokens=64,
        messages=HI,
        stop_sequences=["END"],
        metadata={"user_id": "user-7"},
        # The SDK no longer names the sampling fields; the API and local servers take them.
        extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 5},
    )
    assert raw.headers["x-hal0-mode"] == "translated"
    assert raw.headers["x-hal0-slot"] == "chatty"
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "local"
    assert [(b.type, b.text) for b in message.content] == [("text", "hello from chatty")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)
    assert sent(chatty) == {
        "model": "local",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi there"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "stop": ["END"],
        "user": "user-7",
    }
    assert not chatty.seen("/v1/messages")


def test_a_native_slot_is_still_sent_the_call_as_it_came(claude, chatty, hal0):
    raw = claude.messages.with_raw_response.create(
        model="claude-native", max_tokens=16, messages=HI
    )
    assert raw.headers["x-hal0-mode"] == "passthrough"
    assert raw.parse().content[0].text == "hello from native"


def test_system_blocks_and_system_entries_in_messages(claude, chatty):
    claude.messages.create(
        model="local",
        max_tokens=16,
        system=[
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Answer in French.", "cache_control": {"type": "ephemeral"}},
        ],
        messages=[
            {"role": "system", "content": "Dates are ISO."},  # before any turn: the system's
            {"role": "user", "content": [{"type": "text", "text": "one"}]},
            {"role": "system", "content": [{"type": "text", "text": "A reminder."}]},
            {"role": "assistant", "content": "two"},
            {"role": "user", "content": "three"},
        ],
    )
    assert sent(chatty)["messages"] == [
        {"role": "system", "content": "You are terse.\nAnswer in French.\nDates are ISO."},
        # A later system entry stays where it was said, as user text: chat templates take
        # one system message, first.
        {"role": "user", "content": "one\nA reminder."},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]


def test_images_become_image_url_parts(claude, chatty):
    png = base64.b64encode(b"\x89PNG fake").decode()
    claude.messages.create(
        model="local",
        max_tokens=16,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what are these?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": png},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                ],
            }
        ],
    )
    assert sent(chatty)["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what are these?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
            ],
        }
    ]


def test_tools_and_tool_choice_and_a_tool_call_back(claude, chatty):
    chatty.reply = "Let me look."
    chatty.tool_calls = [ToolCall("get_weather", {"city": "Paris"}, id="call_1")]
    chatty.finish_reason = "tool_calls"
    message = claude.messages.create(
        model="local",
        max_tokens=64,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[
            {**WEATHER, "cache_control": {"type": "ephemeral"}},
            {"type": "web_search_20250305", "name": "web_search"},  # Anthropic's own: dropped
        ],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    body = sent(chatty)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": WEATHER["input_schema"],
            },
        }
    ]
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert message.stop_reason == "tool_use"
    text, call = message.content
    assert text.type == "text" and text.text == "Let me look."
    assert call.type == "tool_use"
    assert (call.id, call.name, call.input) == ("call_1", "get_weather", {"city": "Paris"})

    for choice, expected in (({"type": "auto"}, "auto"), ({"type": "none"}, "none")):
        claude.messages.create(
            model="local", max_tokens=8, messages=HI, tools=[WEATHER], tool_choice=choice
        )
        assert sent(chatty)["tool_choice"] == expected
    # A named tool: that tool alone, and a call required (servers that take only the three
    # words still call it).
    other = {**WEATHER, "name": "get_time"}
    claude.messages.create(
        model="local",
        max_tokens=8,
        messages=HI,
        tools=[WEATHER, other],
        tool_choice={"type": "tool", "name": "get_time"},
    )
    body = sent(chatty)
    assert [t["function"]["name"] for t in body["tools"]] == ["get_time"]
    assert body["tool_choice"] == "required"


def test_a_tool_use_and_tool_result_round_trip(claude, chatty):
    claude.messages.create(
        model="local",
        max_tokens=64,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "two calls", "signature": "sig"},
                    {"type": "text", "text": "Checking."},
                    {
                        "type": "tool_use",
                        "id": "t1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {
                        "type": "tool_use",
                        "id": "t2",
                        "name": "get_weather",
                        "input": {"city": "Rome"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "t2",
                        "content": [{"type": "text", "text": "no such city"}],
                        "is_error": True,
                    },
                    {"type": "text", "text": "and tomorrow?"},
                ],
            },
        ],
    )
    assert sent(chatty)["messages"] == [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",  # the earlier turn's thinking is not sent again
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "t2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: no such city"},
        {"role": "user", "content": "and tomorrow?"},
    ]


def test_max_tokens_reached_is_the_max_tokens_stop_reason(claude, chatty):
    chatty.finish_reason = "length"
    message = claude.messages.create(model="local", max_tokens=3, messages=HI)
    assert message.stop_reason == "max_tokens"
    assert sent(chatty)["max_tokens"] == 3


def test_thinking_is_asked_of_the_chat_template_and_comes_back_as_thinking_blocks(claude, chatty):
    chatty.reasoning = "The user greets me."
    message = claude.messages.create(
        model="local",
        max_tokens=2048,
        messages=HI,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    assert sent(chatty)["chat_template_kwargs"] == {"enable_thinking": True}
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking == "The user greets me."
    assert thinking.signature == ""
    assert text.type == "text" and text.text == "hello from chatty"
    # Not asked for: none comes back (a client reads content[0].text), and the server's
    # default stands.
    message = claude.messages.create(model="local", max_tokens=64, messages=HI)
    assert [b.type for b in message.content] == ["text"]
    assert "chat_template_kwargs" not in sent(chatty)
    claude.messages.create(model="local", max_tokens=64, messages=HI, thinking={"type": "disabled"})
    assert sent(chatty)["chat_template_kwargs"] == {"enable_thinking": False}


def test_cache_control_and_unknown_beta_fields_never_reach_the_server(claude, chatty):
    message = claude.beta.messages.create(
        model="local",
        max_tokens=16,
        cache_control={"type": "ephemeral"},
        system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "hi",
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ],
            }
        ],
        betas=["context-management-2025-06-27", "interleaved-thinking-2025-05-14"],
        extra_body={
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
            "output_config": {"effort": "high"},
            "service_tier": "auto",
            "container": None,
        },
    )
    assert message.content[0].text == "hello from chatty"
    body = sent(chatty)
    assert set(body) == {"model", "messages", "max_tokens"}
    assert b"cache_control" not in chatty.seen("/v1/chat/completions")[-1].body


def test_stream_text_and_final_message(claude, chatty):
    with claude.messages.stream(model="local", max_tokens=64, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "hello from chatty"
    assert [(b.type, b.text) for b in final.content] == [("text", "hello from chatty")]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (11, 7)
    body = sent(chatty)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_stream_events_are_anthropics_in_order_with_one_index_per_block(chatty, hal0):
    chatty.reasoning = "Think first."
    chatty.tool_calls = [ToolCall("get_weather", {"city": "Oslo"}, id="call_9")]
    chatty.finish_reason = "tool_calls"
    body = {
        "model": "local",
        "max_tokens": 64,
        "messages": HI,
        "tools": [WEATHER],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "stream": True,
    }
    with httpx.stream("POST", hal0.url + "/v1/messages", json=body, timeout=10) as r:
        assert r.headers["x-hal0-mode"] == "translated"
        assert r.headers["content-type"].startswith("text/event-stream")
        seen = r.read()
    events = []
    for block in seen.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n")
            assert name.startswith(b"event: ") and data.startswith(b"data: ")
            payload = json.loads(data[6:])
            assert payload["type"] == name[7:].decode()
            events.append(payload)
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[6]["content_block"] == {"type": "text", "text": ""}
    assert events[11]["content_block"] == {
        "type": "tool_use",
        "id": "call_9",
        "name": "get_weather",
        "input": {},
    }
    assert "".join(e["delta"]["partial_json"] for e in events[12:14]) == '{"city": "Oslo"}'
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"] == {"input_tokens": 11, "output_tokens": 7}


def test_a_streamed_tool_call_and_thinking_read_by_the_sdk(claude, chatty):
    chatty.reasoning = "Need weather."
    chatty.tool_calls = [
        ToolCall("get_weather", {"city": "Oslo"}),
        ToolCall("get_weather", {"city": "Bergen"}),
    ]
    chatty.silent = True
    with claude.messages.stream(
        model="local",
        max_tokens=2048,
        messages=HI,
        tools=[WEATHER],
        thinking={"type": "enabled", "budget_tokens": 1024},
    ) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use", "tool_use"]
    assert final.content[0].thinking == "Need weather."
    assert [b.input for b in final.content[1:]] == [{"city": "Oslo"}, {"city": "Bergen"}]
    # The server said "stop" after its calls: the client must still run the tools.
    assert final.stop_reason == "tool_use"


def test_the_stream_is_reframed_as_chunks_arrive(chatty, hal0):
    chatty.hold = threading.Event()
    chatty.reply = "first second third"
    body = {"model": "local", "max_tokens": 64, "messages": HI, "stream": True}
    try:
        with httpx.stream("POST", hal0.url + "/v1/messages", json=body, timeout=10) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: ") and '"text_delta"' in line:
                    break
            # The first piece of text reached the client while the server holds the rest.
            assert json.loads(line[6:])["delta"]["text"] == "first"
            assert chatty.sent == 2  # the role chunk and the first piece
            chatty.hold.set()
            rest = "\n".join(lines)
    finally:
        chatty.hold.set()
    assert rest.count('"text_delta"') == 2 and "message_stop" in rest


def test_a_json_answer_to_a_stream_request_still_reaches_the_client_as_a_stream(claude, chatty):
    chatty.ignores_stream = True
    with claude.messages.stream(model="local", max_tokens=64, messages=HI) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "hello from chatty" and final.usage.output_tokens == 7


def test_an_upstream_error_is_an_anthropic_error(claude, chatty, hal0):
    chatty.fail_status = 400
    with pytest.raises(anthropic.BadRequestError) as exc:
        claude.messages.create(model="local", max_tokens=16, messages=HI)
    assert exc.value.body["type"] == "error"
    assert exc.value.body["error"]["type"] == "invalid_request_error"
    assert "chatty says no" in exc.value.body["error"]["message"]
    assert exc.value.response.headers["x-hal0-mode"] == "translated"
    # Streamed: the same, before any event.
    with (
        pytest.raises(anthropic.BadRequestError),
        claude.messages.stream(model="local", max_tokens=16, messages=HI) as stream,
    ):
        stream.get_final_message()


def test_a_body_the_translator_cannot_read_is_a_400_in_anthropics_shape(chatty, hal0):
    bad = {"model": "local", "max_tokens": 16, "messages": [{"role": "robot", "content": "x"}]}
    r = httpx.post(hal0.url + "/v1/messages", json=bad, timeout=10)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert "messages.0.role" in error["error"]["message"]
    assert r.headers["x-hal0-error"] == "1"
    assert not chatty.seen("/v1/chat/completions")


def test_count_tokens_asks_the_servers_tokenizer(claude, chatty):
    raw = claude.messages.with_raw_response.count_tokens(
        model="local", system="one two", messages=[{"role": "user", "content": "three four five"}]
    )
    assert raw.headers["x-hal0-mode"] == "translated"
    assert raw.parse().input_tokens == 5
    asked = chatty.seen("/tokenize")[-1].json
    assert asked["model"] == "local" and asked["content"] == "one two\nthree four five"
    assert "hal0_estimate" not in json.loads(raw.http_response.content)


def test_count_tokens_without_a_tokenizer_is_an_estimate_said_to_be_one(claude, chatty):
    chatty.tokenizer = False
    text = "a fairly long prompt " * 20
    raw = claude.messages.with_raw_response.count_tokens(
        model="local", messages=[{"role": "user", "content": text}]
    )
    assert raw.http_response.status_code == 200
    counted = json.loads(raw.http_response.content)
    assert counted["hal0_estimate"] is True
    assert raw.parse().input_tokens == counted["input_tokens"] > len(text) // 8
    assert raw.headers["x-hal0-upstream-status"] == "404"
    assert chatty.seen("/tokenize")


def test_a_body_the_translator_cannot_read_is_refused_before_any_wait(
    transactional_db, hal0, settings
):
    # The slot is loading its model: a request waits for it (HAL0_SWAP_WAIT_S), but not
    # one that would be refused anyway.
    settings.HAL0_SWAP_WAIT_S = 60
    fake = ChatUpstream("loading", models=["local"], health="loading")
    server = ServerThread(fake).start()
    try:
        add_slot("loading", server.url + "/v1", ["local"], endpoints=["chat/completions"])
        wait_until(lambda: Slot.objects.get(name="loading").state == LOADING, "slot loading")
        bad = {"model": "local", "max_tokens": "many", "messages": HI}
        r = httpx.post(hal0.url + "/v1/messages", json=bad, timeout=10)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "max_tokens: expected an integer"
    finally:
        server.stop()


def test_a_server_failing_mid_stream_ends_the_stream_with_an_anthropic_error_event():
    # llama.cpp says a failure after its first chunk as one more data event.
    translation = MessagesFromChat("local", thinking=False, streamed=True)
    first = {"id": "c", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}
    failed = {"error": {"code": 500, "message": "out of memory", "type": "server_error"}}
    out = translation.stream(b"data: " + json.dumps(first).encode() + b"\n\n")
    out += translation.stream(b"data: " + json.dumps(failed).encode() + b"\n\ndata: [DONE]\n\n")
    out += translation.end()
    events = [block.split(b"\n") for block in out.split(b"\n\n") if block]
    names = [name.removeprefix(b"event: ").decode() for name, _ in events]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    error = json.loads(events[-1][1].removeprefix(b"data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "out of memory" in error["error"]["message"]
