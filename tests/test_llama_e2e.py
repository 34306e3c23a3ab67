"""End to end against real llama.cpp servers: the demo's two slots behind hal0web.

``primary`` is llama-server in router mode over both tiny models (one loaded at a time),
``agent-hermes`` serves Gemma alone. The client is the official openai SDK. Status, shape,
streaming, usage and which server answered are checked, and that both models answer a plain
question sensibly. Which server answered is proven by the server itself: the two models'
tokenizers and chat templates give different ``prompt_tokens`` for the same prompt.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from dispatch.lifecycle import demo
from tests.conftest import add_slot
from tests.llama_servers import slot_states, start_pair, wait_for_state
from tests.polling import wait_until

pytestmark = pytest.mark.llama

SMOL = demo.SMOLLM2.id  # slot `primary`'s default (the default llm slot)
GEMMA = demo.GEMMA.id  # served by slot `agent-hermes` (alias `hermes`), and by `primary`'s router
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name one colour."}]
STORY: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a long story about a dragon and a king."}
]


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, demo.LlamaServer]]:
    """Both real model servers for the whole session (about a second to start)."""
    yield from start_pair(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def direct_usage(llama_pair: dict[str, demo.LlamaServer]) -> dict[str, int]:
    """prompt_tokens of PROMPT, asked of each server directly (no hal0web in between)."""
    usage = {}
    for slot, server in llama_pair.items():
        client = OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(
            model=server.spec.default.id, messages=PROMPT, max_tokens=1, temperature=0
        )
        assert reply.usage is not None
        usage[slot] = reply.usage.prompt_tokens
    # The proof below only works if the two servers count differently.
    assert usage[demo.PRIMARY.name] != usage[demo.HERMES.name], usage
    return usage


@pytest.fixture
def routed(llama_pair: dict[str, demo.LlamaServer], transactional_db: None, hal0: Any) -> Any:
    """The demo's two slots in the test database as slots/ declares them, hal0web live, both
    slots ready and the router's second model discovered.

    The hal0 fixture probes every 0.2 s with a 0.5 s timeout: far shorter than a generation,
    so these tests also prove that a busy server is not taken for an offline one.
    """
    primary, hermes = llama_pair[demo.PRIMARY.name], llama_pair[demo.HERMES.name]
    add_slot(demo.PRIMARY.name, primary.api_url, [SMOL], is_default=True, kind="llamacpp")
    add_slot(
        demo.HERMES.name,
        hermes.api_url,
        [GEMMA],
        aliases={"hermes": GEMMA},
        kind="llamacpp",
        priority=1,
    )
    for server in llama_pair.values():
        wait_for_state(hal0.url, server.spec.name, "ready")
    wait_until(
        lambda: _served_by(hal0.url, GEMMA) == ["agent-hermes", "primary"],
        "the router's Gemma to be discovered on primary",
        30,
        every=0.1,
    )
    return hal0


def _served_by(url: str, model: str) -> list[str]:
    body = demo.http_get_json(url + "/v1/models?all=true")
    if not isinstance(body, dict):
        return []
    entry = next((m for m in body["data"] if m["id"] == model), None)
    return [s["name"] for s in entry["hal0"]["slots"]] if entry else []


@pytest.fixture
def client(routed: Any) -> OpenAI:
    return OpenAI(base_url=routed.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client: OpenAI, model: str, max_tokens: int = 8) -> tuple[str | None, Any]:
    """One chat through hal0web: (X-Hal0-Slot, parsed completion)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=PROMPT, max_tokens=max_tokens, temperature=0
    )
    return raw.headers.get("x-hal0-slot"), raw.parse()


def prompt_tokens(reply: Any) -> int:
    assert reply.usage is not None
    return int(reply.usage.prompt_tokens)


def test_models_list_shows_both_models_with_their_slots(
    client: OpenAI, llama_pair: dict[str, demo.LlamaServer]
) -> None:
    # Each model once by default; the alias and the slot/model ids on request.
    assert {m.id for m in client.models.list()} == {SMOL, GEMMA}
    models = {m.id: m for m in client.models.list(extra_query={"all": "true"})}
    assert {SMOL, GEMMA, "hermes", f"primary/{SMOL}", f"agent-hermes/{GEMMA}"} <= set(models)
    # Gemma is served twice: by agent-hermes (priority 1, first) and by primary's router.
    assert f"primary/{GEMMA}" in models
    served = (
        (SMOL, ["primary"]),
        (GEMMA, ["agent-hermes", "primary"]),
        ("hermes", ["agent-hermes"]),
    )
    for model_id, slots in served:
        info = models[model_id].model_extra["hal0"]  # type: ignore[index]
        assert [s["name"] for s in info["slots"]] == slots
        assert {s["state"] for s in info["slots"]} == {"ready"}
    assert models[f"agent-hermes/{GEMMA}"].model_extra["hal0"]["slot"] == "agent-hermes"  # type: ignore[index]
    # The model server's own fields, as its /v1/models gives them, not replaced by ours.
    for slot, server in llama_pair.items():
        direct = OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)
        own = {m.id: m for m in direct.models.list()}[server.spec.default.id]
        direct.close()
        assert models[f"{slot}/{server.spec.default.id}"].owned_by == own.owned_by


@pytest.mark.parametrize(
    ("model", "slot"),
    [(SMOL, "primary"), (GEMMA, "agent-hermes"), ("hermes", "agent-hermes")],
)
def test_chat_lands_on_the_right_slot(
    client: OpenAI, direct_usage: dict[str, int], model: str, slot: str
) -> None:
    header, reply = chat(client, model)
    assert header == slot
    # The server's own word: its tokenizer counted the prompt as only that server does.
    assert reply.usage.prompt_tokens == direct_usage[slot]
    assert reply.usage.completion_tokens > 0
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content


@pytest.mark.parametrize("slot", ["primary", "agent-hermes"])
def test_streaming_yields_several_chunks(
    client: OpenAI,
    llama_pair: dict[str, demo.LlamaServer],
    record_property: Any,
    slot: str,
) -> None:
    server = llama_pair[slot]
    direct = OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)

    def first_token_and_chunks(c: OpenAI) -> tuple[float, list[str], str | None]:
        started = time.perf_counter()
        raw = c.chat.completions.with_raw_response.create(
            model=server.spec.default.id, messages=STORY, max_tokens=12, temperature=0, stream=True
        )
        ttft = 0.0
        pieces: list[str] = []
        stream: Any = raw.parse()
        for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            content = chunk.choices[0].delta.content if chunk.choices else None
            if content:
                if not pieces:
                    ttft = time.perf_counter() - started
                pieces.append(content)
        return ttft, pieces, raw.headers.get("x-hal0-slot")

    direct_ttft, direct_pieces, _ = first_token_and_chunks(direct)
    routed_ttft, pieces, header = first_token_and_chunks(client)
    assert header == slot
    assert len(pieces) >= 3, pieces
    # The same greedy prompt on the same server: hal0web relayed every chunk unchanged.
    assert pieces == direct_pieces
    # Recorded, not asserted (timing belongs to bench/): the router's time-to-first-token cost.
    record_property("ttft_direct_ms", round(direct_ttft * 1000, 1))
    record_property("ttft_hal0web_ms", round(routed_ttft * 1000, 1))
    print(
        f"{slot}: TTFT direct {direct_ttft * 1000:.1f} ms, via hal0web {routed_ttft * 1000:.1f} ms"
    )


def test_slot_prefix_pins_the_slot_and_slot_name_uses_its_default(
    client: OpenAI, direct_usage: dict[str, int]
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=f"agent-hermes/{GEMMA}", messages=PROMPT, max_tokens=4, temperature=0
    )
    assert raw.headers["x-hal0-slot"] == "agent-hermes"
    assert raw.headers["x-hal0-resolution"] == "qualified:agent-hermes"
    assert prompt_tokens(raw.parse()) == direct_usage["agent-hermes"]

    raw = client.chat.completions.with_raw_response.create(
        model="agent-hermes", messages=PROMPT, max_tokens=4, temperature=0
    )
    assert raw.headers["x-hal0-slot"] == "agent-hermes"
    assert raw.headers["x-hal0-resolution"] == "slot:agent-hermes"
    assert prompt_tokens(raw.parse()) == direct_usage["agent-hermes"]

    # primary's router has Gemma too: pinned there, it loads it (swapping SmolLM2 out).
    raw = client.chat.completions.with_raw_response.create(
        model=f"primary/{GEMMA}", messages=PROMPT, max_tokens=4, temperature=0
    )
    assert raw.headers["x-hal0-slot"] == "primary"
    assert prompt_tokens(raw.parse()) == direct_usage["agent-hermes"]  # Gemma's count

    # A slot that does not serve the model is not silently used for it.
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model=f"agent-hermes/{SMOL}", messages=PROMPT, max_tokens=4)
    assert exc.value.code == "model_not_found"


def test_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-17-ultra", messages=PROMPT, max_tokens=4)
    assert exc.value.status_code == 404
    assert exc.value.code == "model_not_found"


def test_a_stopped_server_goes_offline_and_its_model_fails_over_to_the_router(
    client: OpenAI,
    routed: Any,
    llama_pair: dict[str, demo.LlamaServer],
    direct_usage: dict[str, int],
) -> None:
    hermes = llama_pair["agent-hermes"]
    try:
        hermes.stop()
        wait_for_state(routed.url, "agent-hermes", "offline")

        # Only agent-hermes serves the alias: no slot can take it.
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="hermes", messages=PROMPT, max_tokens=4)
        assert exc.value.status_code == 503
        assert exc.value.code == "slot_unavailable"

        # The model itself is also in primary's router, which loads it (swapping SmolLM2 out).
        raw = client.chat.completions.with_raw_response.create(
            model=GEMMA, messages=PROMPT, max_tokens=4, temperature=0
        )
        assert raw.headers["x-hal0-slot"] == "primary"
        assert raw.headers["x-hal0-resolution"] == "failover:agent-hermes->primary"
        # The same model and template: the router's instance counts the prompt as hermes did.
        assert prompt_tokens(raw.parse()) == direct_usage["agent-hermes"]

        header, reply = chat(client, SMOL, max_tokens=4)
        assert header == "primary"
        assert reply.usage.prompt_tokens == direct_usage["primary"]
    finally:
        # The pair is shared by the session: bring it back whatever happened above.
        hermes.start()
        hermes.wait_ready(60)

    wait_for_state(routed.url, "agent-hermes", "ready")
    header, reply = chat(client, GEMMA, max_tokens=4)
    assert header == "agent-hermes"
    assert reply.usage.prompt_tokens == direct_usage["agent-hermes"]


@pytest.mark.parametrize(("model", "slot"), [(SMOL, "primary"), (GEMMA, "agent-hermes")])
def test_each_demo_model_answers_a_plain_question_sensibly(
    client: OpenAI, model: str, slot: str
) -> None:
    """Greedy, through hal0web: "Paris", not the question repeated (issue 21: llama-cpp-python's
    Gemma in Gemma's chat format answered "What is the capital of France? mendatang", over
    and over). SmolLM2-135M Q4_1 needs the system message: with its template's default one it
    answers with French landmarks (tests/test_llama_router.py)."""
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=24,
        temperature=0,
    )
    assert raw.headers["x-hal0-slot"] == slot
    text = raw.parse().choices[0].message.content or ""
    assert "Paris" in text
    assert "capital of France?" not in text


def test_a_busy_server_stays_ready(
    client: OpenAI, routed: Any, llama_pair: dict[str, demo.LlamaServer]
) -> None:
    server = llama_pair["primary"]
    stream = client.chat.completions.create(
        model=SMOL, messages=STORY, max_tokens=200, temperature=0, stream=True
    )
    # llama-server answers its listing and /health from its HTTP threads while it generates:
    # exactly what hal0web's probes meet, several times over, during this stream.
    states, pieces, listings = [], 0, []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            if pieces % 20 == 1:
                listings.append(demo.http_get_json(server.api_url + "/models", timeout=0.6))
        states.append(slot_states(routed.url).get("primary"))
    assert pieces > 20
    assert all(isinstance(body, dict) for body in listings), listings
    assert set(states) == {"ready"}, states


@pytest.mark.parametrize(("model", "slot"), [(SMOL, "primary"), ("hermes", "agent-hermes")])
def test_messages_and_responses_reach_the_real_servers(
    client: OpenAI, routed: Any, model: str, slot: str
) -> None:
    """llama-server speaks Anthropic's Messages and OpenAI's Responses API itself (issue 21:
    llama-cpp-python's server answered both with 404)."""
    claude = anthropic.Anthropic(base_url=routed.url, api_key="unused", max_retries=0, timeout=60)
    raw = claude.messages.with_raw_response.create(
        model=model,
        max_tokens=8,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    assert raw.headers["x-hal0-slot"] == slot
    message = raw.parse()
    assert message.type == "message" and message.usage.output_tokens > 0
    claude.close()

    answer = client.responses.with_raw_response.create(
        model=model, input="What is the capital of France?", max_output_tokens=8
    )
    assert answer.headers["x-hal0-slot"] == slot
    response = answer.parse()
    assert response.status == "completed" and response.output_text
