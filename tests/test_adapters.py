"""The request-adapter seam: each target is sent its own (path, body), by the endpoint the
client called and the one its slot offers; the resolver considers a slot that serves an
endpoint only through an adapter."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import orjson
import pytest

from dispatch.models import Slot
from dispatch.routing.resolver import Decision, NoRoute, resolve
from dispatch.routing.states import READY
from dispatch.routing.table import ModelEntry, RoutingTable, make_slot
from dispatch.wire import adapters
from dispatch.wire.adapters import ClientRequest, Outgoing
from dispatch.wire.framing import EventReader
from tests.conftest import add_slot
from tests.fakes import FakeUpstream, ServerThread
from tests.polling import logged, wait_until

# A made-up endpoint a slot can offer; the test adapter serves chat/completions on it by
# sending the request to the slot's /completions, its body rewritten.
OFFERED = "x-test-completions"


def _to_completions(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    sent = orjson.loads(request.body.for_model(upstream_model))
    return Outgoing("completions", orjson.dumps({"model": sent["model"], "prompt": "adapted"}))


@pytest.fixture
def adapter() -> Iterator[Callable[[ClientRequest, str | None], Outgoing]]:
    adapters.register("chat/completions", OFFERED, _to_completions)
    yield _to_completions
    adapters.unregister("chat/completions", OFFERED)


class _Raw:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def for_model(self, upstream_model: str | None) -> bytes:
        return (
            self.raw if upstream_model is None else self.raw.replace(b"m1", upstream_model.encode())
        )


def test_passthrough_is_the_clients_path_less_v1_and_its_body():
    request = ClientRequest("/v1/chat/completions", "a=1", _Raw(b'{"model":"m1"}'))
    assert adapters.adapter_for("chat/completions", {"chat/completions"}) is adapters.passthrough
    assert adapters.outgoing("chat/completions", {"chat/completions"}, request, "up") == (
        Outgoing("chat/completions?a=1", b'{"model":"up"}')
    )
    assert not adapters.serves("chat/completions", {OFFERED})
    with pytest.raises(LookupError):
        adapters.outgoing("chat/completions", {OFFERED}, request, None)
    with pytest.raises(ValueError):
        adapters.register("embeddings", "embeddings", _to_completions)


def test_a_registered_adapter_serves_the_endpoint_and_goes_away_when_unregistered(adapter):
    request = ClientRequest("/v1/chat/completions", "", _Raw(b'{"model":"m1"}'))
    assert adapters.serves("chat/completions", {OFFERED})
    assert adapters.outgoing("chat/completions", {OFFERED}, request, "up") == Outgoing(
        "completions", b'{"model":"up","prompt":"adapted"}'
    )
    # A slot offering the endpoint itself is still sent the request as it came.
    assert adapters.adapter_for("chat/completions", {"chat/completions", OFFERED}) is (
        adapters.passthrough
    )
    adapters.unregister("chat/completions", OFFERED)
    assert not adapters.serves("chat/completions", {OFFERED})


def _table() -> RoutingTable:
    return RoutingTable.build(
        1,
        [
            make_slot(
                "only-x",
                "http://x/v1",
                [ModelEntry("m", "m", "manifest", True)],
                endpoints=frozenset({OFFERED}),
            )
        ],
    )


def test_the_resolver_considers_a_slot_serving_the_endpoint_through_an_adapter():
    table = _table()
    before = resolve(table, "m", "chat/completions")
    assert isinstance(before, NoRoute) and before.code == "endpoint_not_supported"
    adapters.register("chat/completions", OFFERED, _to_completions)
    try:
        after = resolve(table, "m", "chat/completions")
        assert isinstance(after, Decision) and after.slot == "only-x"
        assert isinstance(resolve(table, "only-x/m", "chat/completions"), Decision)
        assert isinstance(resolve(table, "only-x", "chat/completions"), Decision)
        assert isinstance(resolve(table, "m", "embeddings"), NoRoute)
    finally:
        adapters.unregister("chat/completions", OFFERED)
    assert isinstance(resolve(table, "m", "chat/completions"), NoRoute)


def _wait_ready(*names: str) -> None:
    wait_until(
        lambda: all(Slot.objects.get(name=n).state == READY for n in names),
        f"slots {names} ready",
    )


def test_forward_sends_each_target_its_own_path_and_body(adapter, transactional_db, hal0):
    # `sick` offers chat/completions and answers 503: forward fails over to `adapted`, which
    # offers only the made-up endpoint and is sent the adapter's path and body.
    sick = FakeUpstream("sick", models=["m1"], fail_status=503)
    other = FakeUpstream("adapted", models=["m1"])
    servers = [ServerThread(sick).start(), ServerThread(other).start()]
    try:
        add_slot("sick", servers[0].url + "/v1", ["m1"], priority=10)
        add_slot("adapted", servers[1].url + "/v1", ["m1"], endpoints=[OFFERED])
        httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()
        _wait_ready("sick", "adapted")
        r = httpx.post(
            hal0.url + "/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert r.status_code == 200 and r.json()["slot"] == "adapted", r.text
        assert r.headers["X-Hal0-Resolution"] == "failover:sick->adapted"
        (to_sick,) = sick.calls()
        assert to_sick.path == "/v1/chat/completions" and to_sick.json["messages"]
        (to_other,) = [s for s in other.requests if s.path == "/v1/completions"]
        assert to_other.json == {"model": "m1", "prompt": "adapted"}
        assert not [s for s in other.requests if s.path == "/v1/chat/completions"]
    finally:
        for server in servers:
            server.stop()


# --- the way back: a translated call's answer, stream and errors in the client's protocol --


class _Wrapped(adapters.Translation):
    """A toy translation: each upstream JSON answer or event comes back wrapped in
    {"wrapped": ...}, and a stream ends with one event of its own."""

    def __init__(self) -> None:
        self.reader = EventReader()

    def answer(self, content: bytes) -> bytes:
        data = orjson.loads(content)
        if "choices" not in data:
            raise ValueError("no choices")
        return orjson.dumps({"wrapped": data["choices"][0]["message"]["content"]})

    def stream(self, chunk: bytes) -> bytes:
        out = b""
        for _name, data in self.reader.feed(chunk):
            if data != b"[DONE]":
                piece = orjson.loads(data)["choices"][0]["delta"]["content"]
                out += b"event: piece\ndata: " + orjson.dumps({"wrapped": piece}) + b"\n\n"
        return out

    def end(self) -> bytes:
        return b'event: over\ndata: {"over":true}\n\n'


def _wrapping(request: ClientRequest, upstream_model: str | None) -> Outgoing:
    return Outgoing("/v1/chat/completions", request.body.for_model(upstream_model), _Wrapped())


@pytest.fixture
def wrapping_slot(transactional_db, hal0) -> Iterator[FakeUpstream]:
    adapters.register("chat/completions", OFFERED, _wrapping)
    upstream = FakeUpstream("wrapped", models=["m1"])
    server = ServerThread(upstream).start()
    try:
        add_slot("wrapped", server.url + "/v1", ["m1"], endpoints=[OFFERED])
        httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()
        _wait_ready("wrapped")
        yield upstream
    finally:
        adapters.unregister("chat/completions", OFFERED)
        server.stop()


def test_a_translated_answer_and_stream_come_back_in_the_translation_and_say_so(
    wrapping_slot, hal0, settings
):
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(hal0.url + "/v1/chat/completions", json=chat, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"wrapped": "hello from wrapped"}
    assert r.headers["X-Hal0-Mode"] == "translated"
    assert r.headers["content-type"] == "application/json"
    # The upstream was sent a path from its server's root (a leading "/").
    assert [s.path for s in wrapping_slot.calls()] == ["/v1/chat/completions"]

    with httpx.stream(
        "POST", hal0.url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=10
    ) as s:
        body = b"".join(s.iter_bytes())
        assert s.headers["X-Hal0-Mode"] == "translated"
        assert s.headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.split(b"\n\n") if e]
    assert events[0] == b'event: piece\ndata: {"wrapped":"hello from wrapped"}'
    assert events[-1] == b'event: over\ndata: {"over":true}'
    assert len(events) == 1 + wrapping_slot.chunks


def test_a_passthrough_answer_says_so_and_the_log_and_request_log_name_the_mode(
    transactional_db, hal0, settings, caplog
):
    upstream = FakeUpstream("plain", models=["m2"])
    server = ServerThread(upstream).start()
    try:
        add_slot("plain", server.url + "/v1", ["m2"])
        httpx.get(hal0.url + "/healthz", timeout=5).raise_for_status()
        _wait_ready("plain")
        with caplog.at_level("INFO", logger="hal0.dispatch"):
            r = httpx.post(
                hal0.url + "/v1/chat/completions",
                json={"model": "m2", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10,
            )
        assert r.status_code == 200 and r.headers["X-Hal0-Mode"] == "passthrough"
        wait_until(
            lambda: any('"mode":"passthrough"' in m for m in caplog.messages), "the log line"
        )
        [row] = logged(request_id=r.headers["X-Request-Id"])
        assert (row.slot, row.mode) == ("plain", "passthrough")
    finally:
        server.stop()


def test_a_translated_call_failing_upstream_is_told_in_the_clients_protocol(wrapping_slot, hal0):
    wrapping_slot.fail_status = 400  # an OpenAI-shaped error of the offered endpoint
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(hal0.url + "/v1/chat/completions", json=chat, timeout=10)
    assert r.status_code == 400
    assert r.headers["X-Hal0-Mode"] == "translated"
    assert r.json()["error"]["type"] == "invalid_request_error"
