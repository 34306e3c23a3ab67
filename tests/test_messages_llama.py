"""Anthropic Messages translated for the real llama.cpp server: the demo's `primary`
(llama-server in router mode, SmolLM2 loaded) declared as a slot that offers only Chat
Completions, driven by the official `anthropic` SDK. What the server really answers (its
chat completions, its stream, its tool calls under a grammar, its own tokenizer) comes back
as Anthropic's messages."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

from dispatch.lifecycle import demo
from tests.conftest import add_slot
from tests.llama_servers import wait_for_state

pytestmark = pytest.mark.llama

SMOL = demo.SMOLLM2.id
ASK = [{"role": "user", "content": "Name one colour."}]
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
def claude(llama_router, transactional_db: None, hal0: Any) -> Iterator[anthropic.Anthropic]:
    add_slot(
        "primary", llama_router.api_url, [SMOL], kind="llamacpp", endpoints=["chat/completions"]
    )
    wait_for_state(hal0.url, "primary", "ready")
    client = anthropic.Anthropic(base_url=hal0.url, api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def test_a_message_from_the_real_servers_chat_completion(claude):
    raw = claude.messages.with_raw_response.create(
        model=SMOL, system="Answer in one word.", max_tokens=16, messages=ASK
    )
    assert raw.headers["x-hal0-mode"] == "translated"
    message = raw.parse()
    assert message.model == SMOL and message.content[0].type == "text"
    assert message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    cut = claude.messages.create(
        model=SMOL, max_tokens=2, messages=[{"role": "user", "content": "Tell a long story."}]
    )
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


def test_a_stream_from_the_real_server(claude):
    with claude.messages.stream(model=SMOL, max_tokens=16, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.content[0].text == text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


def test_a_tool_use_and_result_history_is_taken_by_the_real_server(claude):
    """llama.cpp reads the translated history (an assistant's tool_calls, the tool's
    message, an image-free user turn) with its own parser and template: a 200, a message."""
    message = claude.messages.create(
        model=SMOL,
        max_tokens=16,
        tools=[WEATHER],
        tool_choice={"type": "auto"},
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
                    {"type": "text", "text": "So, should I take an umbrella?"},
                ],
            },
        ],
    )
    assert message.content and message.usage.input_tokens > 20


def test_count_tokens_is_the_real_servers_tokenizer(claude, llama_router):
    counted = claude.messages.with_raw_response.count_tokens(
        model=SMOL, messages=[{"role": "user", "content": "The quick brown fox jumps."}]
    )
    assert "hal0_estimate" not in json.loads(counted.http_response.content)
    ask = json.dumps({"model": SMOL, "content": "The quick brown fox jumps."}).encode()
    request = urllib.request.Request(
        llama_router.base_url + "/tokenize", ask, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        tokens = json.load(r)["tokens"]
    assert counted.parse().input_tokens == len(tokens) > 0
