"""The Responses API against the real llama.cpp server (the demo's `primary`, SmolLM2 loaded),
driven by the official `openai` SDK: declared as a slot that offers only Chat Completions
(translated by hal0web, which keeps the responses), and as one that speaks Responses itself
(passed through). And /v1/responses/compact: llama-server has none, so its own 404 (never
hal0web's 405), or hal0web's when the slot offers only chat."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from dispatch.lifecycle import demo
from tests.conftest import add_slot
from tests.llama_servers import wait_for_state

pytestmark = pytest.mark.llama

SMOL = demo.SMOLLM2.id
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture
def sdk(llama_router, transactional_db: None, hal0: Any) -> Iterator[openai.OpenAI]:
    # One server, two slots: `chat` offers only Chat Completions, `native` what llama.cpp
    # speaks (its kind's endpoints, the Responses API among them). `chat/` and `native/`
    # prefixes pick the slot.
    add_slot("chat", llama_router.api_url, [SMOL], kind="llamacpp", endpoints=["chat/completions"])
    add_slot("native", llama_router.api_url, [SMOL], kind="llamacpp")
    wait_for_state(hal0.url, "chat", "ready")
    wait_for_state(hal0.url, "native", "ready")
    client = openai.OpenAI(base_url=hal0.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield client
    client.close()


def test_a_response_from_the_real_servers_chat_completion(sdk):
    raw = sdk.responses.with_raw_response.create(
        model=f"chat/{SMOL}",
        instructions="Answer in one word.",
        input="Name one colour.",
        max_output_tokens=16,
    )
    assert raw.headers["x-hal0-mode"] == "translated"
    made = raw.parse()
    assert made.id.startswith("resp_hal0") and made.output_text.strip()
    assert made.usage.input_tokens > 0 and made.usage.output_tokens > 0
    cut = sdk.responses.create(
        model=f"chat/{SMOL}", input="Tell a long story.", max_output_tokens=2
    )
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 2
    # Kept by hal0web: the server has never heard of it, the conversation goes on.
    again = sdk.responses.create(
        model=f"chat/{SMOL}",
        input="And another?",
        previous_response_id=made.id,
        max_output_tokens=16,
    )
    assert again.output_text.strip()
    assert again.usage.input_tokens > made.usage.input_tokens
    assert sdk.responses.retrieve(made.id).output_text == made.output_text


def test_a_stream_from_the_real_server(sdk):
    with sdk.responses.stream(
        model=f"chat/{SMOL}", input="Name one colour.", max_output_tokens=16
    ) as s:
        events = list(s)
        final = s.get_final_response()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip() and final.output_text == text
    assert final.usage.input_tokens > 0


def test_a_tool_call_history_is_taken_by_the_real_server(sdk):
    made = sdk.responses.create(
        model=f"chat/{SMOL}",
        tools=[WEATHER],
        max_output_tokens=32,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
        ],
    )
    assert made.output and made.usage.input_tokens > 20


def test_the_native_slot_passes_responses_through_and_compact_is_never_405(sdk, hal0):
    raw = sdk.responses.with_raw_response.create(
        model=f"native/{SMOL}", input="Name one colour.", max_output_tokens=16
    )
    assert raw.headers["x-hal0-mode"] == "passthrough"
    assert not raw.parse().id.startswith("resp_hal0")
    with httpx.Client(base_url=hal0.url, timeout=60) as c:
        # llama-server has no compaction: its own 404 comes back, as llm-comply expects.
        r = c.post("/v1/responses/compact", json={"model": f"native/{SMOL}", "input": "x"})
        assert r.status_code == 404 and r.headers["x-hal0-mode"] == "passthrough"
        r = c.post("/v1/responses/compact", json={"model": f"chat/{SMOL}", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "endpoint_not_supported"
