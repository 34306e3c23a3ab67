"""The live UI's WebSocket, driven through the real ASGI application with Channels' communicator."""

from __future__ import annotations

import httpx
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from tests.conftest import add_slot
from tests.live import next_event, receive_events

ORIGIN = b"http://localhost"


@pytest.fixture
def app(monkeypatch):
    from hal0web.asgi import application

    # Skip the runtime start-up (watcher, loop binding): these tests make every change
    # themselves, and events from sync code then take the async_to_sync path.
    monkeypatch.setattr(application, "_started", True)
    return application


@pytest.fixture
def cookie(transactional_db) -> bytes:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("ann", password="not-a-real-password")
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


@pytest.fixture
def staff_cookie(transactional_db) -> bytes:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("op", password="not-a-real-password", is_staff=True)
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


@pytest.fixture
def slots(transactional_db):
    return {
        "primary": add_slot("primary", "http://127.0.0.1:9/v1", ["big"], is_default=True),
        "agent-hermes": add_slot(
            "agent-hermes", "http://127.0.0.1:9/v1", ["reap", "other"], aliases={"hermes": "reap"}
        ),
    }


def socket(app, cookie: bytes | None = None, origin: bytes = ORIGIN) -> WebsocketCommunicator:
    # The communicator sends only the headers given; a browser always sends Host, which the
    # Origin check compares with.
    headers = [(b"host", b"localhost"), (b"origin", origin)]
    if cookie:
        headers.append((b"cookie", cookie))
    return WebsocketCommunicator(app, "/ws/dispatch/", headers=headers)


async def connected(app, cookie: bytes) -> tuple[WebsocketCommunicator, dict]:
    comm = socket(app, cookie)
    ok, _ = await comm.connect(timeout=5)
    assert ok
    first = await comm.receive_json_from(timeout=5)
    return comm, first


async def test_snapshot_on_connect(app, cookie, slots):
    comm, snap = await connected(app, cookie)
    try:
        assert snap["type"] == "snapshot"
        assert snap["version"] >= 1
        by_name = {s["name"]: s for s in snap["slots"]}
        assert set(by_name) == {"primary", "agent-hermes"}
        hermes = by_name["agent-hermes"]
        assert hermes["state"] == "unknown"
        assert hermes["inflight"] == 0
        # The slot's default model comes first, aliases after the real models.
        assert [m["id"] for m in hermes["models"]] == ["reap", "other", "hermes"]
        assert hermes["models"][2] == {
            "id": "hermes",
            "upstream": "reap",
            "source": "alias",
            "default": False,
            # Where the model is (a plain server's listing: loaded) and what choosing it does.
            "load": "loaded",
            "progress": None,
            "load_error": "",
            "pinned": False,
            "pattern": False,
            "would_unload": None,
        }
        assert snap["loads"]["names"] == [
            "loaded",
            "loading",
            "unloaded",
            "unloading",
            "failed",
            "sleeping",
        ]
        assert snap["queues"] == []
        assert await comm.receive_nothing(timeout=0.2)
    finally:
        await comm.disconnect()


async def test_deltas_arrive_in_order_after_database_changes(app, cookie, slots):
    comm, snap = await connected(app, cookie)

    def change() -> None:
        from dispatch.models import Slot, SlotModel

        hermes = Slot.objects.get(name="agent-hermes")
        hermes.state = "ready"
        hermes.save()
        SlotModel.objects.create(slot=hermes, model_id="fresh")
        hermes.enabled = False
        hermes.save()
        Slot.objects.get(name="primary").delete()

    try:
        await sync_to_async(change)()
        seen = await receive_events(comm, 4)
        assert [e["type"] for e in seen] == [
            "slot.state",
            "slot.models",
            "slot.state",
            "slot.deleted",
        ]
        assert seen[0]["slot"]["state"] == "ready"
        assert seen[0]["slot"]["previous_state"] == "unknown"
        assert "fresh" in [m["id"] for m in seen[1]["slot"]["models"]]
        assert seen[2]["slot"]["state"] == "disabled"
        assert seen[3]["slot"] == "primary"
        versions = [e["version"] for e in seen]
        assert versions == sorted(versions)
        assert versions[0] > snap["version"]
        assert len(set(versions)) == 4
    finally:
        await comm.disconnect()


async def test_rename_is_a_delete_and_an_update(app, cookie, slots):
    comm, _ = await connected(app, cookie)

    def rename() -> None:
        from dispatch.models import Slot

        slot = Slot.objects.get(name="agent-hermes")
        slot.name = "hermes2"
        slot.save()

    try:
        await sync_to_async(rename)()
        first, second = await receive_events(comm, 2)
        assert (first["type"], first["slot"]) == ("slot.deleted", "agent-hermes")
        assert second["type"] == "slot.updated"
        assert second["slot"]["name"] == "hermes2"
        assert [m["id"] for m in second["slot"]["models"]] == ["reap", "other", "hermes"]
    finally:
        await comm.disconnect()


async def test_page_can_ask_for_a_fresh_snapshot_and_noise_is_ignored(app, cookie, slots):
    comm, snap = await connected(app, cookie)
    try:
        await comm.send_to(text_data="this is not json")
        await comm.send_to(text_data="[1, 2]")
        await comm.send_json_to({"type": "something-else"})
        assert await comm.receive_nothing(timeout=0.2)
        await comm.send_json_to({"type": "snapshot"})
        again = await comm.receive_json_from(timeout=5)
        assert again == snap
    finally:
        await comm.disconnect()


async def test_routing_decisions_reach_the_socket(app, staff_cookie, seed_slots, fake_pair):
    # Staff: the open API's requests are nobody's, and only staff see every decision.
    comm, _ = await connected(app, staff_cookie)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            r = await client.post(
                "/v1/chat/completions",
                json={"model": "hermes", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert r.status_code == 200, r.text
        event = await next_event(comm, "dispatch.decision")
        assert event["slot"] == "agent-hermes"
        assert event["model"] == "hermes"
        assert event["upstream_model"] == "qwen3-coder-reap-25b-a3b-q5km"
        assert event["status"] == 200
        assert event["request_id"] == r.headers["x-request-id"]
    finally:
        await comm.disconnect()
        from dispatch.upstream.client import upstream

        await upstream.aclose()  # its pooled connections belong to this test's loop


async def test_anonymous_connection_is_refused(app, slots):
    comm = socket(app, cookie=None)
    ok, _ = await comm.connect(timeout=5)
    assert not ok
    await comm.wait(timeout=1)


async def test_bad_session_cookie_is_refused(app, slots):
    comm = socket(app, cookie=b"sessionid=forged")
    ok, _ = await comm.connect(timeout=5)
    assert not ok
    await comm.wait(timeout=1)


async def test_foreign_origin_is_refused_even_when_logged_in(app, cookie, slots):
    comm = socket(app, cookie, origin=b"http://evil.example")
    ok, _ = await comm.connect(timeout=5)
    assert not ok
    await comm.wait(timeout=1)
