"""Models on demand against a fake llama.cpp router (tests/fake_llama_router.py): hal0web
reads each model's load state, asks the server to load what a request needs (one load at a
time, making room itself), says how the wait goes, and fails waiters at once when a load
fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dispatch.lifecycle import control
from dispatch.models import Slot, SlotModel
from tests.conftest import add_slot
from tests.fake_llama_router import FakeRouter
from tests.fakes import ServerThread
from tests.polling import wait_until


@pytest.fixture
def router(transactional_db: None, settings: Any) -> Iterator[FakeRouter]:
    settings.HAL0_SWAP_WAIT_S = 10
    settings.HAL0_SWAP_HOLD_S = 3
    fake = FakeRouter("router", models=["m1", "m2", "m3"], models_max=1, chunks=3)
    fake.status["m1"] = "loaded"
    server = ServerThread(fake).start()
    add_slot("r", server.url + "/v1", ["m1", "m2", "m3"], aliases={"two": "m2"})
    yield fake
    server.stop()


def loads_of(slot: str = "r") -> dict[str, str]:
    return dict(SlotModel.objects.filter(slot__name=slot).values_list("model_id", "load_state"))


def ready(hal0: ServerThread) -> None:
    httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()
    wait_until(lambda: Slot.objects.get(name="r").loads_models, what="the slot to load models")
    wait_until(lambda: loads_of()["m1"] == "loaded", what="m1 read as loaded")


def chat(hal0: ServerThread, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(hal0.url + "/v1/chat/completions", json=body, timeout=30)


def test_load_states_are_read_from_the_server(router, hal0):
    ready(hal0)
    assert loads_of() == {"m1": "loaded", "m2": "unloaded", "m3": "unloaded", "two": "unloaded"}
    assert Slot.objects.get(name="r").model_limit == 1  # the router's /props max_instances


def test_an_unloaded_model_is_loaded_on_request_after_hal0web_unloads_the_idle_one(router, hal0):
    ready(hal0)
    answer = chat(hal0, "m2")
    assert answer.status_code == 200, answer.text
    assert int(answer.headers["X-Hal0-Queued-Ms"]) >= 200  # the load took load_delay_s
    # hal0web asked: first the unload of the idle model, then the load; the router's own
    # eviction never ran (it would have unloaded m1 inside the load, not by a request).
    assert router.asked == [("/models/unload", "m1"), ("/models/load", "m2")]
    assert router.load_log == ["m2"] and router.unload_log == ["m1"]
    wait_until(
        lambda: loads_of()["m2"] == "loaded" and loads_of()["m1"] == "unloaded", what="the swap"
    )
    # A loaded model costs no wait.
    again = chat(hal0, "two")
    assert again.status_code == 200 and again.headers["X-Hal0-Queued-Ms"] == "0"


def test_requests_for_the_model_being_loaded_join_one_load(router, hal0):
    ready(hal0)
    router.load_delay_s = 1.0
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(chat(hal0, "m2"))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200] * 5
    assert router.load_log == ["m2"] and router.loading_max == 1


def test_a_failed_load_fails_its_waiters_at_once_with_the_servers_reason(router, hal0, settings):
    ready(hal0)
    router.fail_loads["m2"] = 3
    began = time.monotonic()
    answer = chat(hal0, "m2")
    assert answer.status_code == 502, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "exit" in error["message"] and "'m2'" in error["message"]
    assert time.monotonic() - began < settings.HAL0_SWAP_WAIT_S / 2
    wait_until(lambda: loads_of()["m2"] == "failed", what="m2 read as failed")


def test_a_busy_model_finishes_its_requests_before_it_is_swapped_out(router, hal0):
    ready(hal0)
    router.chunks, router.chunk_gap_s = 8, 0.15  # a stream of about 1.2 s on m1
    streamed: list[int] = []

    def long_stream() -> None:
        body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=30) as r:
            streamed.append(sum(1 for line in r.iter_lines() if line.startswith("data:")))

    stream = threading.Thread(target=long_stream)
    stream.start()
    wait_until(lambda: router.busy.get("m1"), what="the stream on m1")
    answer = chat(hal0, "m2")
    stream.join()
    assert answer.status_code == 200
    assert streamed and streamed[0] >= 8  # the stream on m1 ran to its end
    assert router.unloaded_busy == [] and router.evicted_busy == []


def test_a_pinned_model_is_never_unloaded_to_make_room(router, hal0):
    ready(hal0)
    control.pin("r", "m1")
    answer = chat(hal0, "m2")
    assert answer.status_code == 502
    assert "pinned" in answer.json()["error"]["message"]
    assert router.asked == []


def test_a_stream_that_waits_hears_how_the_wait_goes_in_sse_comments(router, hal0):
    ready(hal0)
    router.load_delay_s = 4.5
    body = {"model": "m2", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    comments = [line for line in lines if line.startswith(": hal0 queued")]
    assert comments, lines
    assert "position=1" in comments[0] and "model=m2" in comments[0]
    assert any("reason=loading" in c for c in comments)
    assert any(line.startswith(": hal0 dequeued queued_ms=") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_the_official_sdk_reads_a_stream_that_began_with_comments(router, hal0):
    import openai

    ready(hal0)
    router.load_delay_s = 3.0
    with openai.OpenAI(base_url=hal0.url + "/v1", api_key="unused", max_retries=0) as client:
        stream = client.chat.completions.create(
            model="m2", messages=[{"role": "user", "content": "x"}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text  # the fake's words, after the comments the SDK skipped


def test_a_stream_whose_load_fails_ends_with_one_error_event(router, hal0):
    ready(hal0)
    router.load_delay_s, router.fail_loads["m2"] = 2.5, 1
    body = {"model": "m2", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [line for line in lines if line.startswith("data:")]
    assert len(events) == 1 and "model_load_failed" in events[0], lines


def test_a_draining_slot_takes_no_new_request(router, hal0):
    ready(hal0)
    control.drain("r")
    wait_until(lambda: Slot.objects.get(name="r").state == "draining", what="draining")
    answer = chat(hal0, "m1")
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "slot_draining"
    assert int(answer.headers["Retry-After"]) > 0
    control.undrain("r")
    wait_until(lambda: chat(hal0, "m1").status_code == 200, what="undrained")


def test_an_operator_load_goes_through_the_same_queue(router, hal0):
    ready(hal0)
    control.ask("r", "m3", control.LOAD)
    wait_until(lambda: loads_of()["m3"] == "loaded", what="m3 loaded", timeout=10)
    assert router.load_log == ["m3"] and router.unload_log == ["m1"]
    wait_until(
        lambda: SlotModel.objects.get(slot__name="r", model_id="m3").wanted == "",
        what="the ask done",
    )
    control.ask("r", "m3", control.UNLOAD)
    wait_until(lambda: loads_of()["m3"] == "unloaded", what="m3 unloaded", timeout=10)


def test_a_model_idle_past_the_slots_idle_timeout_is_unloaded(router, hal0):
    Slot.objects.filter(name="r").update(unload_idle_s=1.0)
    ready(hal0)
    assert chat(hal0, "m1").status_code == 200
    wait_until(lambda: loads_of()["m1"] == "unloaded", what="m1 unloaded when idle", timeout=10)
    assert router.unload_log == ["m1"]


def test_pushed_events_say_a_load_is_done_and_how_far_it_got(router, hal0):
    """The router's /models/sse: its listing never says how far a load got, only its pushed
    events do; hal0web's news (what waiting requests and the pages hear) carries it."""
    from dispatch.coordination import sync

    ready(hal0)
    wait_until(lambda: router.listeners, what="hal0web following /models/sse")
    heard: list[object] = []

    def listen(news: dict[str, object]) -> None:
        heard.append(news.get("progress"))

    sync.loads_news.add(listen)
    try:
        router.load_delay_s = 2.0
        answer = chat(hal0, "m2")
    finally:
        sync.loads_news.remove(listen)
    assert answer.status_code == 200, answer.text
    progress = [p for p in heard if isinstance(p, float)]
    assert progress and 0 < min(progress) < 1, heard


def test_loads_and_waits_are_counted_in_the_metrics(router, hal0, settings):
    settings.HAL0_METRICS_PUBLIC = True
    ready(hal0)

    def loads_ok() -> float:
        text = httpx.get(hal0.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if (
                line.startswith("hal0_model_loads_total{")
                and 'slot="r"' in line
                and 'model="m2"' in line
                and 'outcome="ok"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0  # (the registry is the process's: other tests' loads count too)

    before = loads_ok()
    assert chat(hal0, "m2").status_code == 200
    assert loads_ok() == before + 1
    text = httpx.get(hal0.url + "/metrics", timeout=5).text
    assert "hal0_model_load_seconds_count" in text
    assert "hal0_model_unloads_total" in text and "hal0_model_queue_wait_seconds_count" in text


def test_the_anthropic_sdk_reads_a_messages_stream_that_began_with_comments(router, hal0):
    import anthropic

    ready(hal0)
    router.load_delay_s = 3.0
    with (
        anthropic.Anthropic(base_url=hal0.url, api_key="unused", max_retries=0) as client,
        client.messages.stream(
            model="m2", max_tokens=16, messages=[{"role": "user", "content": "x"}]
        ) as stream,
    ):
        text = "".join(stream.text_stream)
    assert text
    assert router.asked[-1] == ("/models/load", "m2")


def test_the_routers_command_lines_are_neither_kept_nor_shown(router, hal0):
    ready(hal0)
    for fields in SlotModel.objects.filter(slot__name="r").values_list(
        "upstream_fields", flat=True
    ):
        assert "status" not in (fields or {})
    listing = httpx.get(hal0.url + "/v1/models", timeout=5)
    assert "41234" not in listing.text and "/srv/models" not in listing.text
    assert "preset" not in listing.text
    by_id = {m["id"]: m for m in listing.json()["data"]}
    assert by_id["m1"]["status"]["value"] == "loaded"
    assert by_id["m2"]["status"]["value"] == "unloaded"


def test_a_swap_waits_for_the_unloaded_models_server_to_exit_before_the_load(router, hal0):
    """llama-server answers an unload before the model's server has exited, and refuses a
    load past --models-max until it has ("model limit reached, try again later")."""
    ready(hal0)
    router.unload_delay_s = 0.4
    answer = chat(hal0, "m2")
    assert answer.status_code == 200, answer.text
    assert router.refused_loads == []
    assert router.asked == [("/models/unload", "m1"), ("/models/load", "m2")]


def test_draining_lets_a_stream_in_flight_finish_and_turns_new_requests_away(router, hal0):
    ready(hal0)
    router.chunks, router.chunk_gap_s = 10, 0.1  # a stream of about a second
    streamed: list[list[str]] = []

    def stream() -> None:
        body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", hal0.url + "/v1/chat/completions", json=body, timeout=30) as r:
            streamed.append([line for line in r.iter_lines() if line.startswith("data:")])

    on_m1 = threading.Thread(target=stream)
    on_m1.start()
    wait_until(lambda: router.busy.get("m1"), what="the stream under way")
    control.drain("r")
    wait_until(lambda: chat(hal0, "m1").status_code == 503, what="new requests turned away")
    on_m1.join()
    assert streamed and len(streamed[0]) == 11 and streamed[0][-1] == "data: [DONE]"
    assert chat(hal0, "m1").json()["error"]["code"] == "slot_draining"
