"""Ollama's API translated for the real llama.cpp server: the demo's `primary` (llama-server
in router mode, SmolLM2 loaded) declared as a slot that offers chat and text completions,
driven by the official `ollama` client. What the server really answers (its completions,
its stream with its usage, its `timings`, its grammar for `format`) comes back as Ollama's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import ollama
import pytest

from dispatch.lifecycle import demo
from tests.conftest import add_slot
from tests.llama_servers import wait_for_state

pytestmark = pytest.mark.llama

SMOL = demo.SMOLLM2.id
ASK = [{"role": "user", "content": "Name one colour."}]


@pytest.fixture
def client(llama_router, transactional_db: None, hal0: Any) -> Iterator[ollama.Client]:
    add_slot(
        "primary",
        llama_router.api_url,
        [SMOL],
        kind="llamacpp",
        endpoints=["chat/completions", "completions"],
    )
    wait_for_state(hal0.url, "primary", "ready")
    with ollama.Client(host=hal0.url, timeout=120) as c:
        yield c


def test_a_chat_with_the_servers_counts_and_timings(client):
    r = client.chat(model=SMOL, messages=ASK, options={"num_predict": 16}, stream=False)
    assert r.message.content.strip() and r.done and r.done_reason in ("stop", "length")
    assert r.prompt_eval_count > 0 and r.eval_count > 0
    # llama.cpp's own timings: neither is zero, and they fit in the whole.
    assert r.prompt_eval_duration > 0 and r.eval_duration > 0
    assert r.total_duration >= r.prompt_eval_duration
    cut = client.chat(model=SMOL, messages=ASK, options={"num_predict": 2}, stream=False)
    assert cut.done_reason == "length" and cut.eval_count == 2


def test_a_streamed_chat_ends_with_the_servers_usage(client):
    parts = list(client.chat(model=SMOL, messages=ASK, options={"num_predict": 16}, stream=True))
    assert "".join(p.message.content or "" for p in parts).strip()
    last = parts[-1]
    assert last.done and last.eval_count > 0 and last.prompt_eval_count > 0
    assert sum(1 for p in parts if p.message.content) >= 2  # token by token, not one lump


def test_a_raw_generate_is_the_servers_text_completion(client):
    r = client.generate(
        model=SMOL,
        prompt="The capital of France is",
        raw=True,
        options={"num_predict": 4},
        stream=False,
    )
    assert r.response and r.eval_count and r.done_reason in ("stop", "length")


def test_format_is_the_servers_grammar(client):
    schema = {
        "type": "object",
        "properties": {"colour": {"type": "string"}},
        "required": ["colour"],
    }
    r = client.chat(
        model=SMOL, messages=ASK, format=schema, options={"num_predict": 48}, stream=False
    )
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.message.content)["colour"], str)
    else:
        assert r.message.content.lstrip().startswith("{")


def test_a_tool_history_is_taken_by_the_real_server(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "Sunny, 21 C", "tool_name": "get_weather"},
    ]
    tool = {
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
    r = client.chat(
        model=SMOL, messages=messages, tools=[tool], options={"num_predict": 16}, stream=False
    )
    assert r.done and r.prompt_eval_count > 20
