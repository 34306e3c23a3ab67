"""What a slot speaks is known, not assumed (issue 22): the watcher asks each ready server
which endpoints it has (an empty body to each, once per readiness), a request that meets a
missing route writes that down, and every place that shows a slot says what it serves
natively and what hal0web translates; an endpoint a slot neither speaks nor can be
translated to is hal0web's 404 ``endpoint_not_supported`` naming the slot, never the
upstream's 404 passed on.

The servers are fakes over loopback (tests/fakes.py: ``missing`` paths answered as FastAPI
answers a route it lacks, as llama-cpp-python's server does), and a toy translation of
Anthropic Messages to chat completions stands for the real ones (tests/toy_translation.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest

from dispatch import kinds
from dispatch.coordination.store import store
from dispatch.lifecycle import demo
from dispatch.lifecycle.changes import changes
from dispatch.lifecycle.probe import Observation
from dispatch.models import Slot
from dispatch.routing import speaks
from dispatch.routing.explain import explain
from dispatch.routing.resolver import Decision, NoRoute, resolve
from dispatch.routing.states import READY
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot
from dispatch.web.snapshots import slot_payload
from tests.conftest import add_slot
from tests.fakes import FakeUpstream, ServerThread, free_port
from tests.llama_servers import llama_server_binary, skip_without_demo
from tests.polling import wait_until
from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env
from tests.real_llama import RealRouter, running_router
from tests.toy_translation import toy as only_toy
from tests.toy_translation import untranslated as no_translation

LACKING = {"/v1/messages", "/v1/responses"}  # what llama-cpp-python's server has not
MESSAGE = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def untranslated() -> Iterator[None]:
    """No translation serves Anthropic Messages."""
    with no_translation():
        yield


@pytest.fixture
def toy() -> Iterator[None]:
    """Only the toy translation serves Anthropic Messages, on a slot speaking chat."""
    with only_toy():
        yield


# --- pure: where a slot's endpoints come from, how a server says it lacks a route -------------


def test_a_finding_counts_only_for_the_kind_type_and_url_it_was_made_of():
    of = speaks.key("llamacpp", "llm", "http://h:1/v1")
    kept = speaks.stored(of, {"messages": False, "responses": True})
    assert speaks.found_for(kept, of) == {"messages": False, "responses": True}
    assert speaks.found_for(kept, speaks.key("llamacpp", "llm", "http://h:2/v1")) == {}
    assert speaks.found_for(kept, speaks.key("vllm", "llm", "http://h:1/v1")) == {}
    assert speaks.found_for(None, of) == {} and speaks.found_for({"for": of}, of) == {}
    assumed = kinds.get("llamacpp").speaks("llm")
    # Declared > found > the kind's.
    assert speaks.resolved(["chat/completions"], assumed, kept, of) == (
        frozenset({"chat/completions"}),
        {"messages": False, "responses": True},
    )
    native, _ = speaks.resolved([], assumed, kept, of)
    assert native == {"chat/completions", "completions", "responses"}
    native, found = speaks.resolved([], assumed, kept, "another")
    assert native == assumed and found == {}
    assert speaks.source(True, {}) == "manifest"
    assert speaks.source(False, {"messages": False}) == "server"
    assert speaks.source(False, {}) == "kind"


@pytest.mark.parametrize(
    ("status", "body", "text", "lacks", "spoke"),
    [
        (404, {"detail": "Not Found"}, "", True, False),  # FastAPI: llama-cpp-python
        # llama.cpp's llama-server for a path it has no handler for (seen from the real one).
        (404, {"error": {"message": "File Not Found", "type": "not_found_error"}}, "", True, False),
        (404, None, "404 page not found", True, False),  # Go's: Ollama
        (404, None, "404: Not Found", True, False),  # aiohttp
        (404, None, "<html><title>404 Not Found</title><h1>nginx</h1></html>", True, False),
        (404, None, "", True, False),
        (405, {"detail": "Method Not Allowed"}, "", True, False),
        # The route's own answers: what it did not find is named.
        (404, {"error": {"message": "The model 'x' does not exist"}}, "", False, None),
        (404, {"error": "model 'x' not found, try pulling it first"}, "", False, None),
        (400, {"error": {"message": "model name is missing from the request"}}, "", False, True),
        (422, {"detail": [{"msg": "Field required"}]}, "", False, True),
        (200, {}, "", False, True),
        (401, {"error": {"message": "bad key"}}, "", False, None),
        # llama-server (one model) refuses an empty Messages body so: the route's answer.
        (500, {"error": {"message": "'messages' is required"}}, "", False, True),
        (500, None, "Internal Server Error", False, None),
        (502, {"error": {"message": "bad gateway"}}, "", False, None),
        (503, {"error": {"message": "Loading model"}}, "", False, None),
        (None, None, "no answer", False, None),
    ],
)
def test_a_missing_route_is_told_from_the_routes_own_answer(status, body, text, lacks, spoke):
    kind = kinds.get("llamacpp")
    if status is not None:
        assert kind.lacks_route(status, body, text) is lacks
    assert kind.spoke(status, body, text) is spoke


def test_a_llama_cpp_router_is_known_to_speak_them_without_a_question():
    from dispatch.kinds import Loads

    kind = kinds.get("llamacpp")
    router = Loads(models={}, loads_models=True)
    assert kind.knows("llm", router) == {"messages": True, "responses": True}
    assert kind.knows("llm", None) == {}  # one model: llama-server or llama-cpp-python
    assert kind.knows("embedding", router) == {}
    assert kinds.get("openai").knows("llm", router) == {}


def test_the_question_is_an_empty_body_to_each_endpoint_in_question():
    slot = make_slot("s", "http://h:1/v1", kind="llamacpp")
    kind = kinds.get("llamacpp")
    assert kind.asks("llm") == {"messages", "responses"}
    assert kind.asks("embedding") == frozenset()  # nothing in question for its type
    call = kind.ask_call(slot, "messages")
    assert (call.method, call.url, call.body) == ("POST", "http://h:1/v1/messages", {})


def test_a_probe_writes_what_was_found_only_when_it_changes_and_only_of_the_slot_as_it_is():
    slot = make_slot(
        "s", "http://h:1/v1", state=READY, spoken=MappingProxyType({"chat/completions": False})
    )
    of = speaks.key(slot.kind, slot.type, slot.url)

    def seen(found: dict[str, bool] | None, spoken_for: str = of) -> Observation:
        return Observation(READY, "", (), spoken=found, spoken_for=spoken_for)

    # What was found before of the endpoints not asked about now is kept.
    found = {"messages": False, "responses": True}
    assert changes(slot, seen(found)).spoken == {"chat/completions": False, **found}
    same = make_slot("s", "http://h:1/v1", state=READY, spoken=MappingProxyType(found))
    assert not changes(same, seen(found))  # the steady state writes nothing
    assert changes(slot, seen(None)).spoken is None  # not asked this time
    # Found of another URL (the slot moved while the question was out): not the slot's.
    assert changes(slot, seen(found, speaks.key("llamacpp", "llm", "http://h:2/v1"))).spoken is None


def _slot(endpoints: set[str]):
    return make_slot(
        "lcp",
        "http://h/v1",
        [ModelEntry("smollm2-lcp", "smollm2-lcp", "manifest", True)],
        endpoints=frozenset(endpoints),
        spoken=MappingProxyType({"messages": False, "responses": False}),
    )


def test_what_a_slot_serves_natively_and_translated(toy):
    slot = _slot({"chat/completions", "completions"})
    assert speaks.serving(slot.endpoints) == {
        "chat/completions": "native",
        "completions": "native",
        "messages": "translated",
    }
    assert speaks.shown(slot.endpoints) == "chat/completions, completions, messages · translated"
    payload = slot_payload(slot)
    assert payload["serves"] == speaks.serving(slot.endpoints)
    assert payload["endpoints"] == ["chat/completions", "completions"]
    assert payload["endpoints_from"] == "server"


def test_the_explanation_says_a_translation(toy):
    table = RoutingTable.build(1, [_slot({"chat/completions", "completions"})])
    decision = resolve(table, "smollm2-lcp", "messages")
    assert isinstance(decision, Decision)
    why = explain(decision, endpoint="messages", mode="translated")
    assert why.text == (
        "answered by lcp: the only slot serving 'smollm2-lcp' (unknown)"
        " (messages · translated to chat/completions)"
    )
    assert why.served == "translated" and why.as_dict()["served"] == "translated"
    native = explain(decision, endpoint="chat/completions", mode="passthrough")
    assert native.text == "answered by lcp: the only slot serving 'smollm2-lcp' (unknown)"
    assert native.served == "native"
    # Before it was sent (no mode yet), the table says how it would be.
    assert explain(decision, endpoint="messages").served == "translated"


def test_a_slot_that_neither_speaks_nor_translates_is_named_on_every_path(untranslated):
    lcp = _slot({"chat/completions", "completions"})
    lcp = make_slot(
        "lcp",
        "http://h/v1",
        [
            ModelEntry("smollm2-lcp", "smollm2-lcp", "manifest", True),
            ModelEntry("small", "smollm2-lcp", "alias"),
        ],
        endpoints=lcp.endpoints,
        is_default=True,
    )
    table = RoutingTable.build(1, [lcp])
    for model in ("smollm2-lcp", "small", "lcp/smollm2-lcp", "lcp", None):
        miss = resolve(table, model, "messages")
        assert isinstance(miss, NoRoute), model
        assert (miss.status, miss.code, miss.slot) == (404, "endpoint_not_supported", "lcp")
        assert "'lcp'" in miss.message and "messages" in miss.message, miss.message
        assert "speaks chat/completions, completions" in miss.message


# --- the watcher asks; every place shows it ---------------------------------------------------


@pytest.fixture
def lcp_and_full() -> Iterator[tuple[FakeUpstream, FakeUpstream, str, str]]:
    """A server lacking Messages and Responses (llama-cpp-python's), and one with both."""
    lcp = FakeUpstream("lcp", models=["smollm2-lcp"], missing=set(LACKING))
    full = FakeUpstream("full", models=["full-model"])
    servers = [ServerThread(lcp).start(), ServerThread(full).start()]
    yield lcp, full, servers[0].url + "/v1", servers[1].url + "/v1"
    for server in servers:
        server.stop()


def _found(name: str) -> dict[str, bool]:
    slot = store.table.slots.get(name)
    return dict(slot.spoken) if slot is not None else {}


def _probes(fake: FakeUpstream) -> int:
    return len(fake.seen("/v1/models"))


def test_the_watcher_asks_each_ready_server_once_and_every_place_shows_it(
    lcp_and_full, hal0, toy, admin_client
):
    lcp, _, lcp_url, full_url = lcp_and_full
    add_slot("lcp", lcp_url, ["smollm2-lcp"])
    add_slot("full", full_url, ["full-model"])
    httpx.get(hal0.url + "/healthz", timeout=5)
    wait_until(lambda: _found("lcp") == {"messages": False, "responses": False}, "lcp asked")
    wait_until(lambda: _found("full") == {"messages": True, "responses": True}, "full asked")

    # The questions: an empty body to each endpoint in question, marked as hal0web's own.
    asked = sorted((q.path, q.body, q.headers["x-hal0-probe"]) for q in lcp.questions)
    assert asked == [("/v1/messages", b"{}", "endpoints"), ("/v1/responses", b"{}", "endpoints")]
    # The table, on every process (the row, whence the table): native endpoints corrected.
    assert store.table.slots["lcp"].endpoints == {"chat/completions", "completions"}
    assert store.table.slots["full"].endpoints == kinds.get("llamacpp").speaks("llm")
    row = Slot.objects.get(name="lcp")
    assert row.spoken == {
        "for": speaks.key("llamacpp", "llm", lcp_url),
        "found": {"messages": False, "responses": False},
    }

    # Once per readiness: more probes ask nothing more.
    seen = _probes(lcp)
    wait_until(lambda: _probes(lcp) >= seen + 3, "three more probes")
    assert len(lcp.questions) == 2

    # The page's snapshot.
    payload = slot_payload(store.table.slots["lcp"])
    assert payload["serves"] == {
        "chat/completions": "native",
        "completions": "native",
        "messages": "translated",
    }
    assert payload["endpoints_from"] == "server"

    # /v1/models: per slot, what it speaks and how it serves each endpoint.
    data = {m["id"]: m for m in httpx.get(hal0.url + "/v1/models", timeout=5).json()["data"]}
    (on_lcp,) = data["smollm2-lcp"]["hal0"]["slots"]
    assert on_lcp["endpoints"] == ["chat/completions", "completions"]
    assert on_lcp["serves"] == payload["serves"] and on_lcp["endpoints_from"] == "server"
    (on_full,) = data["full-model"]["hal0"]["slots"]
    assert on_full["serves"]["messages"] == "native"

    # The admin: the list says what it serves, the slot's page what its server answered.
    html = admin_client.get("/admin/dispatch/slot/").content.decode()
    assert "chat/completions, completions, messages · translated (its server, asked)" in html
    html = admin_client.get(f"/admin/dispatch/slot/{row.pk}/change/").content.decode()
    assert "messages: no, responses: no" in html

    # Down and back: asked again.
    lcp.health = "error"
    wait_until(lambda: store.table.slots["lcp"].state != READY, "lcp down")
    lcp.health = "ready"
    wait_until(lambda: len(lcp.questions) == 4, "lcp asked again once back")


def test_a_request_for_what_a_slot_cannot_serve_is_refused_naming_it(
    lcp_and_full, hal0, untranslated
):
    lcp, _, lcp_url, _ = lcp_and_full
    add_slot("lcp", lcp_url, ["smollm2-lcp"])
    httpx.get(hal0.url + "/healthz", timeout=5)
    wait_until(lambda: _found("lcp") == {"messages": False, "responses": False}, "lcp asked")
    r = httpx.post(hal0.url + "/v1/messages", json={**MESSAGE, "model": "smollm2-lcp"}, timeout=10)
    assert r.status_code == 404, r.text
    assert r.json()["type"] == "error"  # Anthropic's shape, on its path
    assert "'lcp'" in r.json()["error"]["message"]
    assert r.headers["X-Hal0-Error"] == "1"
    r = httpx.post(hal0.url + "/v1/responses", json={"model": "smollm2-lcp", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "endpoint_not_supported"
    assert "'lcp'" in r.json()["error"]["message"]
    assert not lcp.calls()  # nothing forwarded to be answered 404 there


def test_a_translated_call_says_so_in_its_explanation(lcp_and_full, hal0, toy, caplog):
    lcp, _, lcp_url, _ = lcp_and_full
    add_slot("lcp", lcp_url, ["smollm2-lcp"])
    httpx.get(hal0.url + "/healthz", timeout=5)
    wait_until(lambda: _found("lcp") == {"messages": False, "responses": False}, "lcp asked")
    with caplog.at_level("INFO", logger="hal0.dispatch"):
        r = httpx.post(
            hal0.url + "/v1/messages", json={**MESSAGE, "model": "smollm2-lcp"}, timeout=10
        )
        assert r.status_code == 200, r.text
        assert r.headers["X-Hal0-Mode"] == "translated"
        assert r.json()["content"][0]["text"] == "hello from lcp"
        wait_until(lambda: _decision(caplog, r) is not None, "the log line")
    why = _decision(caplog, r)["why"]
    assert why["served"] == "translated"
    assert why["text"].endswith("(messages · translated to chat/completions)"), why["text"]
    assert [c.path for c in lcp.calls()] == ["/v1/chat/completions"]


def _decision(caplog: pytest.LogCaptureFixture, r: httpx.Response) -> dict | None:
    for message in caplog.messages:
        if r.headers["X-Request-Id"] in message and message.startswith("{"):
            return json.loads(message)
    return None


def test_a_manifests_list_is_not_asked_about_and_overrides(lcp_and_full, hal0, untranslated):
    lcp, full, lcp_url, full_url = lcp_and_full
    # Declared off on a server that has them: the manifest is the operator's word.
    add_slot("full", full_url, ["full-model"], endpoints=["chat/completions"])
    # Declared on a server that lacks it: the manifest's word still, until a request finds out.
    add_slot("lcp", lcp_url, ["smollm2-lcp"], endpoints=["chat/completions", "messages"])
    httpx.get(hal0.url + "/healthz", timeout=5)
    wait_until(lambda: all(_probes(f) >= 3 for f in (lcp, full)), "a few probes")
    assert not lcp.questions and not full.questions
    assert store.table.slots["full"].endpoints == {"chat/completions"}
    assert store.table.slots["lcp"].endpoints == {"chat/completions", "messages"}
    assert slot_payload(store.table.slots["full"])["endpoints_from"] == "manifest"
    r = httpx.post(hal0.url + "/v1/messages", json={**MESSAGE, "model": "full-model"})
    assert r.status_code == 404 and "'full'" in r.json()["error"]["message"]
    assert not full.seen("/v1/messages")
    # The declared route is missing: hal0web's 404 naming the slot, not the upstream's.
    r = httpx.post(hal0.url + "/v1/messages", json={**MESSAGE, "model": "smollm2-lcp"})
    assert r.status_code == 404 and r.headers["X-Hal0-Error"] == "1"
    assert "Slot 'lcp' does not serve messages" in r.json()["error"]["message"]
    # Written down (the admin shows it), but the manifest's word stands: the next request
    # is sent again, and refused again in hal0web's words.
    wait_until(lambda: _found("lcp") == {"messages": False}, "the finding")
    assert store.table.slots["lcp"].endpoints == {"chat/completions", "messages"}
    r = httpx.post(hal0.url + "/v1/messages", json={**MESSAGE, "model": "smollm2-lcp"})
    assert r.status_code == 404 and r.headers["X-Hal0-Error"] == "1"
    assert len(lcp.seen("/v1/messages")) == 2


# --- a request meets a missing route ----------------------------------------------------------


@pytest.fixture
def changing(hal0) -> Iterator[FakeUpstream]:
    """A server found to speak Messages and Responses, which then loses both (another server
    now answers at its URL)."""
    fake = FakeUpstream("changing", models=["cm"])
    server = ServerThread(fake).start()
    try:
        add_slot("changing", server.url + "/v1", ["cm"])
        httpx.get(hal0.url + "/healthz", timeout=5)
        wait_until(lambda: _found("changing") == {"messages": True, "responses": True}, "asked")
        fake.missing = set(LACKING)
        yield fake
    finally:
        server.stop()


def test_a_missing_route_met_by_a_request_is_written_down_and_refused(changing, hal0, untranslated):
    url = hal0.url
    r = httpx.post(url + "/v1/messages", json={**MESSAGE, "model": "cm"}, timeout=10)
    assert r.status_code == 404, r.text
    assert r.headers["X-Hal0-Error"] == "1"  # hal0web's word, not the upstream's 404
    assert "Slot 'changing' does not serve messages" in r.json()["error"]["message"]
    wait_until(lambda: _found("changing").get("messages") is False, "the finding in the table")
    assert _found("changing")["responses"] is True  # only what was met
    # The next request is refused before it reaches the server.
    r = httpx.post(url + "/v1/messages", json={**MESSAGE, "model": "cm"}, timeout=10)
    assert r.status_code == 404
    assert "No slot serving 'cm' serves messages" in r.json()["error"]["message"]
    assert len(changing.seen("/v1/messages")) == 1


def test_a_missing_route_met_by_a_request_is_served_translated_at_once(changing, hal0, toy):
    url = hal0.url
    r = httpx.post(url + "/v1/messages", json={**MESSAGE, "model": "cm"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["X-Hal0-Mode"] == "translated"
    assert r.json()["content"][0]["text"] == "hello from changing"
    wait_until(lambda: _found("changing").get("messages") is False, "the finding in the table")
    r = httpx.post(url + "/v1/messages", json={**MESSAGE, "model": "cm"}, timeout=10)
    assert r.status_code == 200 and r.headers["X-Hal0-Mode"] == "translated"
    assert len(changing.seen("/v1/messages")) == 1  # met once, translated since
    assert len(changing.seen("/v1/chat/completions")) == 2


def test_a_route_answering_its_own_404_is_not_taken_for_a_missing_route(
    changing, hal0, untranslated
):
    changing.fail_status = 404  # an OpenAI-shaped 404 of the route itself ("... says no")
    url = hal0.url
    chat = {"model": "cm", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=10)
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "changing says no"}}  # the server's, as it said
    assert r.headers["X-Hal0-Upstream-Status"] == "404"
    assert "chat/completions" in store.table.slots["changing"].endpoints
    assert "chat/completions" not in _found("changing")


# --- every process: a second worker sees what the leader's watcher found ----------------------


def _slot_seen(worker: Hal0Process, model: str) -> dict | None:
    """The `hal0` word on the one slot serving ``model``, as ``worker``'s /v1/models says."""
    data = httpx.get(worker.url + "/v1/models", timeout=5).json()["data"]
    found = [m["hal0"]["slots"][0] for m in data if m["id"] == model]
    return found[0] if found else None


@pytest.mark.postgres
@pytest.mark.redis
def test_every_worker_converges_on_what_a_slot_speaks(tmp_path: Path, pg_url: str):
    """Two real hal0web processes on PostgreSQL and Redis: the leader's watcher asks the
    server; the other process, which asks nothing, serves from the same finding. A route a
    request then finds missing on the standby reaches the leader the same way."""
    lcp = FakeUpstream("lcp", models=["smollm2-lcp"], missing=set(LACKING))
    server = ServerThread(lcp).start()
    workers: list[Hal0Process] = []
    try:
        env = server_env(
            tmp_path,
            DATABASE_URL=pg_url,
            REDIS_URL=redis_url_or_skip(),
            HAL0_PROBE_INTERVAL_S="0.3",
        )
        manage(env, "migrate", "-v0")
        folder = tmp_path / "slots"
        folder.mkdir()
        (folder / "lcp.toml").write_text(
            f'name = "lcp"\nurl = "{server.url}/v1"\nkind = "llamacpp"\n\n'
            '[model]\ndefault = "smollm2-lcp"\n'
        )
        manage(env, "slots", "import", str(folder))
        workers += [Hal0Process(env, tmp_path / f"worker-{i}.log").wait_ready() for i in (1, 2)]
        wait_until(lambda: sum("leads the watcher" in w.log() for w in workers) == 1, "a leader")
        [standby] = [w for w in workers if "leads the watcher" not in w.log()]
        [leader] = [w for w in workers if w is not standby]

        def speaks_on(worker: Hal0Process) -> tuple[list[str], str] | None:
            seen = _slot_seen(worker, "smollm2-lcp")
            return None if seen is None else (seen["endpoints"], seen["endpoints_from"])

        asked = (["chat/completions", "completions"], "server")
        wait_until(lambda: speaks_on(standby) == asked, "the standby to see the finding", 15)
        assert speaks_on(leader) == asked
        assert sorted(q.path for q in lcp.questions) == ["/v1/messages", "/v1/responses"]

        # The standby meets a missing route (the server lost its text completions): the
        # leader's table hears of it.
        lcp.missing.add("/v1/completions")
        r = httpx.post(
            standby.url + "/v1/completions", json={"model": "smollm2-lcp", "prompt": "hi"}
        )
        # hal0web's own word (or a translation, where one is registered): never the
        # upstream's 404 passed on.
        assert r.status_code == 200 or r.json()["error"]["code"] == "endpoint_not_supported", r.text
        gone = (["chat/completions"], "server")
        wait_until(lambda: speaks_on(leader) == gone, "the leader to hear of it", 15)
    finally:
        for worker in workers:
            worker.stop()
        server.stop()


# --- the real llama.cpp llama-server ----------------------------------------------------------


@pytest.fixture
def real_router(tmp_path: Path) -> Iterator[RealRouter]:
    with running_router(tmp_path) as router:
        yield router


@pytest.fixture
def real_single(tmp_path: Path) -> Iterator[demo.LlamaServer]:
    """The real llama-server with one model (the demo's agent-hermes: Gemma), ready."""
    skip_without_demo()
    paths = demo.model_paths(tmp_path / "models")
    args = demo.server_args(demo.HERMES, paths, tmp_path / "models")
    env = demo.servers_env(tmp_path / "models" / "llama-cache")
    server = demo.LlamaServer(
        demo.HERMES, llama_server_binary(), args, free_port(), tmp_path / "llama.log", env=env
    )
    try:
        server.start()
        server.wait_ready(60)
        yield server
    finally:
        server.stop()


@pytest.mark.llama
def test_the_real_one_model_llama_server_is_found_to_speak_them_too(
    real_single, hal0, untranslated
):
    """With one model, llama-server refuses an empty Messages body with a 500 of its own
    ("'messages' is required") and an empty Responses body with a 400: both routes are
    there."""
    add_slot("single", real_single.api_url, [])
    httpx.get(hal0.url + "/healthz", timeout=5)
    wait_until(lambda: _found("single") == {"messages": True, "responses": True}, "asked", 30)
    assert store.table.slots["single"].endpoints >= {"messages", "responses"}


@pytest.mark.llama
def test_the_real_llama_server_is_found_to_speak_messages_and_responses(
    real_router, hal0, untranslated
):
    """llama.cpp's router is llama-server (llama-cpp-python has no router mode), which has
    both: its readings say so, and it is not asked (its HTTP pool is fragile at start-up).
    Asked all the same, it answers 400 (no model named) without loading anything. A slot
    listing them off is sent neither, and a request for one is refused naming the slot (or
    served translated, where a translation is registered)."""
    add_slot("real", real_router.api_url, [])
    add_slot("off", real_router.api_url, [], endpoints=["chat/completions", "completions"])
    httpx.get(hal0.url + "/healthz", timeout=5)
    wait_until(lambda: _found("real") == {"messages": True, "responses": True}, "found", 30)
    assert store.table.slots["real"].endpoints >= {"messages", "responses"}
    assert speaks.serving(store.table.slots["real"].endpoints)["messages"] == "native"
    kind, slot = kinds.get("llamacpp"), store.table.slots["real"]
    for endpoint in ("messages", "responses"):
        call = kind.ask_call(slot, endpoint)
        r = httpx.request(call.method, call.url, json=call.body, timeout=10)
        assert kind.spoke(r.status_code, r.json(), "") is True, (endpoint, r.text)
    assert set(real_router.states().values()) == {"unloaded"}  # the questions loaded nothing
    wait_until(lambda: "gemma3-270m" in store.table.slots["off"].models, "off's models read")
    assert _found("off") == {} and "messages" not in speaks.serving(
        store.table.slots["off"].endpoints
    )
    r = httpx.post(hal0.url + "/v1/messages", json={**MESSAGE, "model": "off/gemma3-270m"})
    assert r.status_code == 404 and "'off'" in r.json()["error"]["message"], r.text
    assert set(real_router.states().values()) == {"unloaded"}
    # Spoken natively, sent as it came: the router loads the model and answers in its words.
    r = httpx.post(
        hal0.url + "/v1/messages",
        json={**MESSAGE, "model": "real/smollm2-135m-instruct", "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.headers["X-Hal0-Mode"] == "passthrough" and r.json()["type"] == "message"


# --- a look at an answer's start leaves it whole ----------------------------------------------


@pytest.fixture
def streaming() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream("s", models=["m1"], chunks=6, chunk_gap_s=0.01)
    server = ServerThread(fake).start()
    yield fake, server.url + "/v1"
    server.stop()


async def test_a_peek_at_a_body_leaves_it_whole_for_the_relay(streaming) -> None:
    from dispatch.upstream.client import Upstream

    _, url = streaming
    slot = make_slot("s", url, [ModelEntry("m1", "m1", "manifest")])
    body = b'{"model": "m1", "stream": true, "messages": []}'
    up = Upstream()
    try:
        whole = b"".join(
            [c async for c in (await up.open(slot, "chat/completions", body, {})).chunks()]
        )
        response = await up.open(slot, "chat/completions", body, {})
        first = await response.peek(10)
        assert first == whole[:10]
        assert await response.peek(30) == whole[:30]  # a longer look reads on
        assert b"".join([c async for c in response.chunks()]) == whole  # all of it, once
        assert whole.count(b"data: ") == 7  # six chunks and [DONE]
        # In memory (a mock transport at the seam), the same.
        await up.aclose()
        up.use_transport(httpx.MockTransport(lambda r: httpx.Response(404, content=b"Not Found")))
        response = await up.open(slot, "chat/completions", body, {})
        assert await response.peek(4096) == b"Not Found"
        assert await response.read(1024) == b"Not Found"
    finally:
        await up.aclose()
