"""The Responses API through hal0web, driven by the official `openai` SDK: routed by model,
and every later request about a response sent to the slot that made it."""

from __future__ import annotations

import httpx
import openai
import pytest
from asgiref.sync import async_to_sync

from dispatch.coordination.affinity import StreamSniffer, affinity, response_id
from tests import runtime


def test_create_lands_on_the_slot_serving_the_model(fleet_sdk, fleet):
    raw = fleet_sdk.responses.with_raw_response.create(model="beta", input="hi")
    assert raw.headers["x-hal0-slot"] == "llm-b"
    assert raw.headers["x-hal0-resolution"] == "model:llm-b"
    made = raw.parse()
    assert made.output_text == "hello from llm-b"
    assert made.id.startswith("resp_llm-b_")
    assert fleet["llm-b"].seen("/v1/responses")[-1].json["model"] == "beta"
    # An alias is rewritten, as on every endpoint.
    made = fleet_sdk.responses.create(model="al", input="hi")
    assert made.output_text == "hello from llm-a"
    assert fleet["llm-a"].seen("/v1/responses")[-1].json["model"] == "alpha"


def test_a_stream_passes_event_by_event_and_its_id_is_recorded(fleet_sdk, fleet):
    kinds = []
    text = ""
    made_id = None
    with fleet_sdk.responses.create(model="beta", input="hi", stream=True) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.created":
                made_id = event.response.id
            if event.type == "response.output_text.delta":
                text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert text == "hello from llm-b"
    assert made_id is not None and made_id.startswith("resp_llm-b_")
    # Recorded from the stream's response.created: a follow-up finds its slot.
    again = fleet_sdk.responses.retrieve(made_id)
    assert again.id == made_id


def test_previous_response_id_goes_to_the_slot_that_made_it(fleet_sdk, fleet):
    first = fleet_sdk.responses.create(model="beta", input="hi")
    # `model` alone would pick llm-a; the id's slot wins.
    raw = fleet_sdk.responses.with_raw_response.create(
        model="alpha", input="and then?", previous_response_id=first.id
    )
    assert raw.headers["x-hal0-slot"] == "llm-b"
    assert raw.headers["x-hal0-resolution"] == "affinity:llm-b"
    assert raw.parse().output_text == f"hello from llm-b (after {first.id})"
    assert not [s for s in fleet["llm-a"].seen("/v1/responses") if "previous_response_id" in s.json]


def test_retrieve_input_items_cancel_and_delete_follow_the_id(fleet_sdk, fleet):
    made = fleet_sdk.responses.create(model="beta", input="remember me")
    other = fleet_sdk.responses.create(model="alpha", input="me too")
    raw = fleet_sdk.responses.with_raw_response.retrieve(made.id)
    assert raw.headers["x-hal0-resolution"] == "affinity:llm-b"
    assert raw.parse().id == made.id
    assert fleet_sdk.responses.retrieve(other.id).id == other.id  # and that one on llm-a
    items = fleet_sdk.responses.input_items.list(made.id, limit=5)
    assert [i.content[0].text for i in items.data] == ["remember me"]
    # The query string goes upstream as sent.
    assert fleet["llm-b"].calls()[-1].path == f"/v1/responses/{made.id}/input_items?limit=5"
    assert fleet_sdk.responses.cancel(made.id).status == "cancelled"
    fleet_sdk.responses.delete(made.id)
    assert fleet["llm-b"].calls()[-1].path == f"/v1/responses/{made.id}"
    # Deleted upstream: the slot that held it says so (its own 404 passes through).
    with pytest.raises(openai.NotFoundError):
        fleet_sdk.responses.retrieve(made.id)


def test_an_unknown_id_is_a_404_never_a_guess(fleet_sdk, fleet):
    with pytest.raises(openai.NotFoundError) as exc:
        fleet_sdk.responses.retrieve("resp_nobody_made_this")
    assert exc.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError) as exc:
        fleet_sdk.responses.create(model="alpha", input="x", previous_response_id="resp_unknown")
    assert exc.value.code == "response_not_found"
    for name in ("llm-a", "llm-b"):
        assert not [s for s in fleet[name].requests if "resp_unknown" in s.path + repr(s.body)]


def test_responses_only_reach_slots_that_offer_them(fleet_sdk, fleet, hal0):
    # A transcription model has no Responses endpoint: a clear 404, nothing forwarded.
    with pytest.raises(openai.NotFoundError) as exc:
        fleet_sdk.responses.create(model="whisper-a", input="hi")
    assert exc.value.code == "endpoint_not_supported"
    assert "stt-a" in exc.value.message and "audio/transcriptions" in exc.value.message
    assert not fleet["stt-a"].seen("/v1/responses")


def test_the_record_is_kept_out_of_the_state_version(no_watcher, fleet, hal0):
    from dispatch.models import ResponseAffinity, StateVersion

    before = StateVersion.current()
    with httpx.Client(base_url=hal0.url, timeout=10) as c:
        r = c.post("/v1/responses", json={"model": "beta", "input": "x"})
    rid = r.json()["id"]
    assert ResponseAffinity.objects.get(response_id=rid).slot == "llm-b"
    assert StateVersion.current() == before  # a response reloads no routing table


def test_retention_prunes_old_records(transactional_db, settings):
    import datetime as dt

    from dispatch.coordination import affinity_db
    from dispatch.models import ResponseAffinity

    settings.HAL0_RESPONSE_RETENTION_DAYS = 1
    now = dt.datetime.now(dt.UTC)
    ResponseAffinity.objects.create(
        response_id="old", slot="a", created_at=now - dt.timedelta(days=2)
    )
    ResponseAffinity.objects.create(response_id="new", slot="a", created_at=now)
    assert affinity_db.find("old") is None  # past the bound: not found even before pruning
    assert affinity_db.prune() == 1
    assert list(ResponseAffinity.objects.values_list("response_id", flat=True)) == ["new"]


def test_the_stream_sniffer_finds_the_id_across_chunks():
    s = StreamSniffer()
    event = b'event: response.created\r\ndata: {"type":"response.created","response":{"id":"resp_1"}}\r\n\r\n'
    assert s.feed(event[:30]) is None
    assert s.feed(event[30:]) == "resp_1"
    assert s.done and s.feed(event) is None
    assert response_id(b'{"id": "resp_2", "object": "response"}') == "resp_2"
    assert response_id(b'{"id": "chatcmpl", "object": "chat.completion"}') is None
    assert response_id(b"not json") is None


@pytest.mark.redis
def test_redis_keeps_the_record_with_a_ttl(settings, transactional_db):  # a miss asks it too
    redis = pytest.importorskip("redis")
    settings.REDIS_URL = "redis://127.0.0.1:6379/0"
    settings.HAL0_RESPONSE_RETENTION_DAYS = 1
    runtime.reset("affinity")  # the Redis store, now that REDIS_URL names one
    try:

        async def run() -> tuple[str | None, str | None]:
            await affinity.remember("resp_redis_test", "llm-b")
            affinity._recent.clear()  # as another worker: only Redis knows it
            found = await affinity.lookup("resp_redis_test")
            missing = await affinity.lookup("resp_never_made")
            await affinity.aclose()
            return found, missing

        assert async_to_sync(run)() == ("llm-b", None)
        client = redis.Redis.from_url(settings.REDIS_URL)
        ttl = client.ttl("hal0:response:resp_redis_test")
        assert 86400 - 60 < ttl <= 86400
        client.delete("hal0:response:resp_redis_test")
        client.close()
    finally:
        runtime.reset("affinity")  # its Redis client is not the next test's


# --- across real server processes: every worker finds every id -------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("store", ["database", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_response_made_through_one_worker_is_found_by_another(tmp_path, pg_url, store):
    from tests.fakes import FakeUpstream, ServerThread
    from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env

    fakes = {n: FakeUpstream(n, models=[f"model-{n}"], listing="llama.cpp") for n in ("one", "two")}
    servers = [ServerThread(f).start() for f in fakes.values()]
    folder = tmp_path / "slots"
    folder.mkdir()
    for (name, _), server in zip(fakes.items(), servers, strict=True):
        (folder / f"{name}.toml").write_text(
            f'name = "{name}"\nurl = "{server.url}/v1"\n[model]\ndefault = "model-{name}"\n'
        )
    extra = {"REDIS_URL": redis_url_or_skip()} if store == "redis" else {}
    env = server_env(tmp_path, DATABASE_URL=pg_url, HAL0_PROBE_INTERVAL_S="1", **extra)
    manage(env, "migrate", "-v0")
    manage(env, "slots", "import", str(folder))
    workers = [Hal0Process(env, tmp_path / f"worker-{i}.log") for i in (1, 2)]
    try:
        for w in workers:
            w.wait_ready()
        first, second = (
            openai.OpenAI(base_url=w.url + "/v1", api_key="x", max_retries=0) for w in workers
        )
        made = first.responses.create(model="model-two", input="hi")
        # The other worker has never seen it: only the shared store knows where it lives.
        raw = second.responses.with_raw_response.retrieve(made.id)
        assert raw.headers["x-hal0-resolution"] == "affinity:two"
        assert raw.parse().id == made.id
        with second.responses.create(model="model-one", input="hi", stream=True) as stream:
            streamed = next(e.response.id for e in stream if e.type == "response.created")
        follow = first.responses.with_raw_response.create(
            model="model-two", input="more", previous_response_id=streamed
        )
        assert follow.headers["x-hal0-resolution"] == "affinity:one"
        if store == "database":
            count = manage(
                env,
                "shell",
                "-c",
                "from dispatch.models import ResponseAffinity as R; print(R.objects.count())",
            )
            assert count.strip().splitlines()[-1] == "3"
        first.close()
        second.close()
    finally:
        for w in workers:
            w.stop()
        for s in servers:
            s.stop()
