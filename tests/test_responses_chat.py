"""The Responses API on a slot that speaks only chat/completions, driven by the official
`openai` SDK through hal0web: the request translated to chat, the answer and the stream
translated back, and the responses kept by hal0web itself (the slot keeps nothing), so
previous_response_id, retrieve, input_items and delete work there too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import add_slot
from tests.fake_chat_agent import ChatAgent
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import decision_lines

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    agent = ChatAgent(FakeUpstream("chatty", models=["talker"], listing="llama.cpp"))
    native = FakeUpstream("native", models=["nat"], listing="llama.cpp")
    threads = [ServerThread(agent).start(), ServerThread(native).start()]
    yield {"agent": agent, "native": native, "urls": [t.url for t in threads]}
    for thread in threads:
        thread.stop()


@pytest.fixture
def agent(servers, transactional_db) -> ChatAgent:
    chat_url, native_url = servers["urls"]
    add_slot("chatty", chat_url + "/v1", ["talker"], endpoints=["chat/completions"])
    add_slot("native", native_url + "/v1", ["nat"])  # an llm slot: Responses natively
    agent: ChatAgent = servers["agent"]
    agent.calls_tools = True
    return agent


@pytest.fixture
def sdk(agent, hal0) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=hal0.url + "/v1", api_key="unused", max_retries=0)
    yield client
    client.close()


def _sent(agent: ChatAgent) -> dict[str, Any]:
    return agent.chats()[-1]


# --- the answer --------------------------------------------------------------------------------


def test_a_string_input_and_instructions_are_answered_as_a_response(sdk, agent):
    raw = sdk.responses.with_raw_response.create(
        model="talker", input="hi there", instructions="Answer briefly."
    )
    assert raw.headers["x-hal0-slot"] == "chatty"
    assert raw.headers["x-hal0-mode"] == "translated"
    made = raw.parse()
    assert made.object == "response" and made.status == "completed"
    assert made.id.startswith("resp_hal0")
    assert made.model == "talker"  # the name the client asked for
    assert made.output_text == "hello from chatty"
    assert made.instructions == "Answer briefly."
    sent = _sent(agent)
    assert sent["model"] == "talker" and "stream" not in sent
    assert sent["messages"] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "hi there"},
    ]
    # Chat's counts, under the Responses API's names.
    assert made.usage.input_tokens == 4 and made.usage.output_tokens == 3
    assert made.usage.total_tokens == 7
    assert made.usage.output_tokens_details.reasoning_tokens == 0


def test_input_items_of_every_role_and_images(sdk, agent):
    made = sdk.responses.create(
        model="talker",
        instructions="Be kind.",
        input=[
            {"role": "developer", "content": "Use metric units."},
            {
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": "No emoji."}],
            },
            {"role": "user", "content": "hello"},
            {
                "role": "assistant",
                "content": [{"type": "output_text", "text": "hi!", "annotations": []}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,AAAA",
                        "detail": "low",
                    },
                ],
            },
        ],
    )
    assert made.output_text == "hello from chatty"
    assert _sent(agent)["messages"] == [
        # The leading system messages as one, the first a chat template sees.
        {"role": "system", "content": "Be kind.\n\nUse metric units.\n\nNo emoji."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi!"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {
                    "type": "image_url",
                    "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"},
                },
            ],
        },
    ]


def test_function_tools_round_trip_and_hosted_tools_are_dropped_and_said(sdk, agent):
    raw = sdk.responses.with_raw_response.create(
        model="talker",
        input="Paris",
        tools=[WEATHER_TOOL, {"type": "web_search"}],
        tool_choice="auto",
    )
    assert raw.headers["x-hal0-dropped"] == "web_search"
    made = raw.parse()
    (call,) = made.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id == "call_chatty_1" and call.arguments == '{"city": "Paris"}'
    sent = _sent(agent)
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city.",
                "parameters": WEATHER_TOOL["parameters"],
            },
        }
    ]
    assert sent["tool_choice"] == "auto"
    assert made.tools[0].name == "get_weather" and len(made.tools) == 1
    # The tool's result, with the whole conversation in the input (no stored state used).
    again = sdk.responses.create(
        model="talker",
        input=[
            {"role": "user", "content": "Paris"},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert again.output_text == "the tool said: 18 C, sunny"
    assert _sent(agent)["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_chatty_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_chatty_1", "content": "18 C, sunny"},
    ]


def test_a_forced_tool_choice_is_chats(sdk, agent):
    other = {**WEATHER_TOOL, "name": "get_time"}
    made = sdk.responses.create(
        model="talker",
        input="Lima",
        tools=[WEATHER_TOOL, other],
        tool_choice={"type": "function", "name": "get_time"},
    )
    assert made.output[0].name == "get_time"
    assert _sent(agent)["tool_choice"] == {"type": "function", "function": {"name": "get_time"}}


class Weather(BaseModel):
    city: str
    degrees: float


def test_text_format_json_schema_is_response_format(sdk, agent):
    parsed = sdk.responses.parse(model="talker", input="weather?", text_format=Weather)
    assert parsed.output_parsed == Weather(city="sunny", degrees=21.5)
    fmt = _sent(agent)["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Weather"
    assert fmt["json_schema"]["strict"] is True
    assert set(fmt["json_schema"]["schema"]["properties"]) == {"city", "degrees"}
    sdk.responses.create(model="talker", input="x", text={"format": {"type": "json_object"}})
    assert _sent(agent)["response_format"] == {"type": "json_object"}


def test_reasoning_effort_and_the_reasoning_it_brings(sdk, agent):
    made = sdk.responses.create(model="talker", input="think", reasoning={"effort": "high"})
    assert _sent(agent)["reasoning_effort"] == "high"
    reasoning, message = made.output
    assert reasoning.type == "reasoning"
    assert reasoning.content[0].text == "thinking high about it"
    assert message.type == "message" and made.output_text == "hello from chatty"
    assert made.usage.output_tokens_details.reasoning_tokens == 4
    assert made.reasoning.effort == "high"


def test_max_output_tokens_cut_short_is_incomplete(sdk, agent):
    made = sdk.responses.create(model="talker", input="talk", max_output_tokens=2)
    assert _sent(agent)["max_tokens"] == 2
    assert made.status == "incomplete"
    assert made.incomplete_details.reason == "max_output_tokens"
    assert made.output_text == "hello from"
    assert made.max_output_tokens == 2


# --- the stream --------------------------------------------------------------------------------


def _checked(events: list[Any]) -> list[str]:
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))  # from 0, one more each event
    return [e.type for e in events]


def test_a_stream_is_the_typed_events_in_order(sdk, agent):
    with sdk.responses.stream(model="talker", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = _checked(events)
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == (
        "hello from chatty"
    )
    assert final.output_text == "hello from chatty" and final.status == "completed"
    assert events[0].response.id == final.id and final.id.startswith("resp_hal0")
    assert final.usage.input_tokens == 1 and final.usage.output_tokens == 3
    sent = _sent(agent)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_a_streamed_tool_call_reasoning_and_a_cut(sdk, agent):
    with sdk.responses.create(
        model="talker",
        input="Oslo",
        tools=[WEATHER_TOOL],
        reasoning={"effort": "low"},
        stream=True,
    ) as stream:
        events = list(stream)
    kinds = _checked(events)
    assert kinds[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
    ]
    assert kinds[11:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-1].response
    reasoning, call = done.output
    assert reasoning.content[0].text == "thinking low about it "
    assert (call.name, call.arguments, call.call_id) == (
        "get_weather",
        '{"city": "Oslo"}',
        "call_chatty_1",
    )
    with sdk.responses.stream(model="talker", input="talk", max_output_tokens=1) as stream:
        final = stream.get_final_response()
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].status == "incomplete" and final.output_text == "hello"


# --- what hal0web keeps ------------------------------------------------------------------------


def test_previous_response_id_chains_the_conversation(sdk, agent):
    first = sdk.responses.create(model="talker", input="my name is Ada", instructions="Be terse.")
    second = sdk.responses.create(model="talker", input="who am I?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # instructions do not carry over (as OpenAI's), the conversation does.
    assert _sent(agent)["messages"] == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "hello from chatty"},
        {"role": "user", "content": "who am I?"},
    ]
    with sdk.responses.stream(
        model="talker", input="and now?", previous_response_id=second.id
    ) as s:
        third = s.get_final_response()
    assert [m["content"] for m in _sent(agent)["messages"]] == [
        "my name is Ada",
        "hello from chatty",
        "who am I?",
        "hello from chatty",
        "and now?",
    ]
    # A stream's response is kept too, when its response.completed passes.
    assert sdk.responses.retrieve(third.id).output_text == "hello from chatty"


def test_a_tool_result_continues_a_kept_response(sdk, agent):
    asked = sdk.responses.create(model="talker", input="Rome", tools=[WEATHER_TOOL])
    call = asked.output[0]
    answered = sdk.responses.create(
        model="talker",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "25 C"}],
        tools=[WEATHER_TOOL],
    )
    assert answered.output_text == "the tool said: 25 C"
    roles = [m["role"] for m in _sent(agent)["messages"]]
    assert roles == ["user", "assistant", "tool"]


def test_retrieve_input_items_and_delete_are_answered_by_hal0web(sdk, agent):
    first = sdk.responses.create(model="talker", input="one")
    made = sdk.responses.create(
        model="talker",
        previous_response_id=first.id,
        input=[{"role": "user", "content": "two"}, {"role": "user", "content": "three"}],
    )
    calls = len(agent.chats())
    raw = sdk.responses.with_raw_response.retrieve(made.id)
    assert raw.headers["x-hal0-resolution"] == "stored"
    assert raw.parse().model_dump() == made.model_dump()
    # Everything the model was given, newest first by default, a page at a time.
    page = sdk.responses.input_items.list(made.id, limit=2)
    assert [i.content[0].text for i in page.data] == ["three", "two"]
    assert page.has_more is True
    every = [
        i.content[0].text if i.type == "message" else i.type
        for i in sdk.responses.input_items.list(made.id, limit=2)
    ]
    assert every == ["three", "two", "hello from chatty", "one"]
    asc = sdk.responses.input_items.list(made.id, order="asc")
    assert [i.content[0].text for i in asc.data] == ["one", "hello from chatty", "two", "three"]
    assert asc.has_more is False
    # The slot was never asked (only chat, and the watcher's probes, ever reach it).
    assert len(agent.chats()) == calls
    assert not [s for s in agent.upstream.requests if s.path.startswith("/v1/responses")]
    with pytest.raises(openai.BadRequestError):
        sdk.responses.cancel(made.id)
    sdk.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as exc:
        sdk.responses.retrieve(made.id)
    assert exc.value.code == "response_not_found"
    # The one before it is still there (its own row).
    assert sdk.responses.retrieve(first.id).output_text == "hello from chatty"


def test_store_false_keeps_nothing(sdk, agent):
    made = sdk.responses.create(model="talker", input="forget me", store=False)
    assert made.store is False
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="talker", input="x", previous_response_id=made.id)
    with sdk.responses.stream(model="talker", input="forget me too", store=False) as s:
        streamed = s.get_final_response()
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(streamed.id)


def test_the_store_is_the_database(no_watcher, sdk, agent):
    from dispatch.models import StateVersion, StoredResponse

    before = StateVersion.current()
    made = sdk.responses.create(model="talker", input="keep me")
    row = StoredResponse.objects.get(response_id=made.id)
    assert (row.slot, row.model, row.upstream_model) == ("chatty", "talker", "talker")
    assert row.response["output"][0]["content"][0]["text"] == "hello from chatty"
    assert row.input_items[0]["content"] == [{"type": "input_text", "text": "keep me"}]
    assert StateVersion.current() == before  # a response reloads no routing table


def test_retention_prunes_old_stored_responses(transactional_db, settings):
    import datetime as dt

    from asgiref.sync import async_to_sync

    from dispatch.coordination import stored_responses
    from dispatch.models import StoredResponse

    settings.HAL0_RESPONSE_RETENTION_DAYS = 1
    now = dt.datetime.now(dt.UTC)
    for rid, at in (("resp_hal0old", now - dt.timedelta(days=2)), ("resp_hal0new", now)):
        StoredResponse.objects.create(
            response_id=rid, created_at=at, slot="s", response={"id": rid}, input_items=[]
        )
    assert async_to_sync(stored_responses.find)("resp_hal0old") is None  # past the bound
    assert async_to_sync(stored_responses.find)("resp_hal0new") is not None
    assert stored_responses.prune() == 1
    assert list(StoredResponse.objects.values_list("response_id", flat=True)) == ["resp_hal0new"]


def test_a_key_reaches_only_responses_of_its_models(agent, hal0):
    from dispatch.models import ApiKey

    _, everything = ApiKey.issue("all")
    _, other = ApiKey.issue("other", models=["nat"])
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        made = c.post(
            "/v1/responses",
            json={"model": "talker", "input": "x"},
            headers={"Authorization": f"Bearer {everything}"},
        ).json()
        r = c.get(f"/v1/responses/{made['id']}", headers={"Authorization": f"Bearer {other}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        r = c.get(f"/v1/responses/{made['id']}", headers={"Authorization": f"Bearer {everything}"})
        assert r.status_code == 200


# --- one Responses API, two kinds of slot -------------------------------------------------------


def test_the_mode_says_translated_or_passthrough(sdk, servers):
    native = sdk.responses.with_raw_response.create(model="nat", input="hi")
    assert native.headers["x-hal0-mode"] == "passthrough"
    assert native.parse().id.startswith("resp_native_")
    chat = sdk.responses.with_raw_response.create(model="talker", input="hi")
    assert chat.headers["x-hal0-mode"] == "translated"
    assert servers["native"].seen("/v1/responses")[-1].json["input"] == "hi"


def test_a_kept_conversation_continues_on_a_native_slot(sdk, agent, servers):
    # The id is hal0web's; the model the follow-up asks is served natively: that slot has
    # never seen the id, so it is sent the conversation itself.
    first = sdk.responses.create(model="talker", input="remember 7")
    follow = sdk.responses.create(model="nat", input="which number?", previous_response_id=first.id)
    assert follow.output_text == "hello from native"
    sent = servers["native"].seen("/v1/responses")[-1].json
    assert "previous_response_id" not in sent
    assert [(i["type"], i.get("role")) for i in sent["input"]] == [
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
    ]
    assert sent["input"][-1]["content"] == [{"type": "input_text", "text": "which number?"}]


def test_compact_is_routed_by_model_never_405(sdk, agent, servers, hal0):
    compacted = sdk.responses.compact(model="nat", input="a long story")
    assert compacted.object == "response.compaction"
    assert compacted.output[-1].type == "compaction"
    assert servers["native"].seen("/v1/responses/compact")[-1].json["model"] == "nat"
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        r = c.post("/v1/responses/compact", json={"model": "nat", "input": "x"})
        assert r.status_code == 200 and r.headers["x-hal0-mode"] == "passthrough"
        r = c.post("/v1/responses/compact", json={"model": "talker", "input": "x"})
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "endpoint_not_supported" and "chatty" in error["message"]
        r = c.post("/v1/responses/compact", json={"model": "nobody", "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    # A response id path still is one.
    made = sdk.responses.create(model="talker", input="x")
    assert sdk.responses.retrieve(made.id).id == made.id


def test_what_cannot_be_translated_is_a_clear_400(sdk, agent, hal0):
    calls = len(agent.chats())
    with pytest.raises(openai.BadRequestError) as exc:
        sdk.responses.create(model="talker", input="x", background=True)
    assert exc.value.code == "unsupported_parameter" and exc.value.param == "background"
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        for body, param in (
            ({"model": "talker", "input": 3}, "input"),
            ({"model": "talker", "input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
            (
                {"model": "talker", "input": [{"type": "function_call", "name": "f"}]},
                "input[0].call_id",
            ),
            ({"model": "talker", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
            (
                {"model": "talker", "input": "x", "text": {"format": {"type": "json_schema"}}},
                "text.format.schema",
            ),
            ({"model": "talker", "input": "x", "max_output_tokens": "many"}, "max_output_tokens"),
            ({"model": "talker"}, "input"),
        ):
            r = c.post("/v1/responses", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param
    assert len(agent.chats()) == calls  # nothing reached the slot


def test_a_translated_stream_says_what_it_dropped_and_logs_its_tokens(agent, hal0, caplog):

    body = {"model": "talker", "input": "hi", "stream": True, "tools": [{"type": "file_search"}]}
    with (
        caplog.at_level("INFO", logger="hal0.dispatch"),
        httpx.Client(base_url=hal0.url, timeout=10) as c,
        c.stream("POST", "/v1/responses", json=body) as r,
    ):
        assert r.headers["x-hal0-dropped"] == "file_search"
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-hal0-mode"] == "translated"
        r.read()
        rid = r.headers["x-request-id"]
        lines = [line for line in decision_lines(caplog) if line["request_id"] == rid]
    # The counts the Response's last event carries (its upstream's usage chunk).
    assert (lines[-1]["prompt_tokens"], lines[-1]["completion_tokens"]) == (1, 3)


# --- across real server processes: every worker answers from the same store ---------------------


@pytest.mark.postgres
def test_a_kept_response_is_answered_by_another_worker(tmp_path, pg_url, servers):
    from tests.processes import Hal0Process, manage, server_env

    chat_url, _ = servers["urls"]
    folder = tmp_path / "slots"
    folder.mkdir()
    (folder / "chatty.toml").write_text(
        f'name = "chatty"\nurl = "{chat_url}/v1"\nendpoints = ["chat/completions"]\n'
        '[model]\ndefault = "talker"\n'
    )
    env = server_env(tmp_path, DATABASE_URL=pg_url, HAL0_PROBE_INTERVAL_S="1")
    manage(env, "migrate", "-v0")
    manage(env, "slots", "import", str(folder))
    workers = [Hal0Process(env, tmp_path / f"worker-{i}.log") for i in (1, 2)]
    try:
        for w in workers:
            w.wait_ready()
        first, second = (
            openai.OpenAI(base_url=w.url + "/v1", api_key="x", max_retries=0) for w in workers
        )
        made = first.responses.create(model="talker", input="from the first worker")
        # The other worker never saw it: only the database knows it.
        raw = second.responses.with_raw_response.retrieve(made.id)
        assert raw.headers["x-hal0-resolution"] == "stored"
        assert raw.parse().output_text == "hello from chatty"
        items = second.responses.input_items.list(made.id)
        assert [i.content[0].text for i in items.data] == ["from the first worker"]
        with second.responses.stream(
            model="talker", input="and the second", previous_response_id=made.id
        ) as s:
            follow = s.get_final_response()
        assert [m["content"] for m in servers["agent"].chats()[-1]["messages"]] == [
            "from the first worker",
            "hello from chatty",
            "and the second",
        ]
        first.responses.delete(follow.id)
        with pytest.raises(openai.NotFoundError):
            second.responses.retrieve(follow.id)
        first.close()
        second.close()
    finally:
        for w in workers:
            w.stop()


def llm_comply(base_url: str, model: str) -> dict[str, str]:
    """llm-comply's Open Responses conformance suite against ``base_url``: each test's status."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    command = str(Path(sys.executable).with_name("llm-comply"))
    done = subprocess.run(
        [command, "-u", base_url, "-k", "unused", "-m", model, "--json", "--timeout", "120"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    results = json.loads(done.stdout)["results"]
    return {r["id"]: r["status"] for r in results}


def test_llm_comply_finds_the_translation_conformant(agent, hal0):
    # Open Responses' conformance suite, every test (the reasoning one asks for an o-series
    # model by name, and skips).
    found = llm_comply(hal0.url + "/v1", "talker")
    assert {t for t, status in found.items() if status not in ("passed", "skipped")} == set()
    assert found["tool-calling"] == found["streaming-response"] == "passed"
    assert found["compact-response"] == "passed"  # advisory: a 404 it accepts (not a 405)
