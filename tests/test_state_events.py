"""Slot-state changes reach a WebSocket client as `slot.state` events, in order."""

from __future__ import annotations

import asyncio

from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from dispatch.coordination import events
from dispatch.lifecycle.watcher import watcher
from dispatch.upstream.client import upstream
from dispatch.web.consumers import DispatchConsumer
from tests.conftest import add_slot
from tests.live import receive_events


async def next_state(comm: WebsocketCommunicator, slot: str, timeout: float = 5) -> dict:
    """The next `slot.state` event for ``slot`` (other events are skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for event in await receive_events(comm, 1, max(0.01, deadline - loop.time())):
            if event["type"] == "slot.state" and event["slot"]["name"] == slot:
                return event


async def test_state_changes_arrive_in_order(fake, settings, django_user_model):
    f, server = fake
    settings.HAL0_PROBE_INTERVAL_S = 0.1
    user = await sync_to_async(django_user_model.objects.create_user)("u", password="p")
    await sync_to_async(add_slot)("a", server.url + "/v1", ["m1"])
    events.bind_loop(asyncio.get_running_loop())
    comm = WebsocketCommunicator(DispatchConsumer.as_asgi(), "/ws/dispatch/")
    comm.scope["user"] = user
    connected, _ = await comm.connect()
    assert connected
    snap = await comm.receive_json_from()
    assert snap["type"] == "snapshot"
    assert [s["state"] for s in snap["slots"]] == ["unknown"]
    watcher.start()
    try:
        seen = [await next_state(comm, "a")]
        f.health = "loading"
        seen.append(await next_state(comm, "a"))
        f.health = "ready"
        seen.append(await next_state(comm, "a"))
    finally:
        await watcher.stop()
        await upstream.aclose()  # the probes' pooled connections belong to this test's loop
        await comm.disconnect()
    assert [(e["slot"]["previous_state"], e["slot"]["state"]) for e in seen] == [
        ("unknown", "ready"),
        ("ready", "loading"),
        ("loading", "ready"),
    ]
    versions = [e["version"] for e in seen]
    assert versions == sorted(versions) and len(set(versions)) == 3


async def test_inflight_counts_reach_the_page_coalesced(transactional_db, django_user_model):
    from dispatch.upstream.admission import admission

    user = await sync_to_async(django_user_model.objects.create_user)("u", password="p")
    events.bind_loop(asyncio.get_running_loop())
    comm = WebsocketCommunicator(DispatchConsumer.as_asgi(), "/ws/dispatch/")
    comm.scope["user"] = user
    assert (await comm.connect())[0]
    assert (await comm.receive_json_from())["type"] == "snapshot"
    for _ in range(50):  # a burst: one event, not fifty
        assert admission.try_acquire("a", 0)
    assert admission.try_acquire("b", 0)
    assert await receive_events(comm, 1, 2) == [
        {"type": "slot.inflight", "inflight": {"a": 50, "b": 1}}
    ]
    assert await comm.receive_nothing(timeout=0.15)
    for _ in range(50):
        admission.release("a")
    assert await receive_events(comm, 1, 2) == [{"type": "slot.inflight", "inflight": {"a": 0}}]
    await comm.disconnect()


async def test_an_ejected_slot_shows_degraded_live_with_its_reason(
    transactional_db, django_user_model
):
    from dispatch.coordination.store import store
    from dispatch.upstream.outliers import EJECT_AFTER, outliers

    user = await sync_to_async(django_user_model.objects.create_user)("u", password="p")
    await sync_to_async(add_slot)("a", "http://127.0.0.1:9/v1", ["m1"], state="ready")
    await sync_to_async(store.reload)()
    events.bind_loop(asyncio.get_running_loop())

    async def connect() -> tuple[WebsocketCommunicator, dict]:
        comm = WebsocketCommunicator(DispatchConsumer.as_asgi(), "/ws/dispatch/")
        comm.scope["user"] = user
        assert (await comm.connect())[0]
        return comm, await comm.receive_json_from()

    comm, snap = await connect()
    assert [s["state"] for s in snap["slots"]] == ["ready"]
    for _ in range(EJECT_AFTER):
        outliers.failed(store.table.slots["a"], "slot 'a' sent no response within 300s", 30)
    # At once (this process's judgement), then again from the table once it is written for
    # every process.
    event = await next_state(comm, "a")
    assert event["slot"]["state"] == "degraded"
    assert event["slot"]["previous_state"] == "ready"
    assert "no response within 300s" in event["slot"]["last_error"]
    event = await next_state(comm, "a")
    assert (event["slot"]["previous_state"], event["slot"]["state"]) == ("degraded", "degraded")
    assert event["version"] > event["from_version"]
    assert store.table.slots["a"].ejection is not None
    late, late_snap = await connect()  # a page opened now sees it in its snapshot
    assert [s["state"] for s in late_snap["slots"]] == ["degraded"]
    outliers.succeeded(store.table.slots["a"])
    event = await next_state(comm, "a")
    assert (event["slot"]["previous_state"], event["slot"]["state"]) == ("degraded", "ready")
    await comm.disconnect()
    await late.disconnect()
