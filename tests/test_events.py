"""The events module: what async code publishes reaches the group, in order, whatever loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import get_channel_layer

from dispatch.coordination import events


async def _listen() -> tuple[Any, str]:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await events.join(channel, staff=True, username="op")
    return layer, channel


async def _received(layer: Any, channel: str, n: int) -> list[dict[str, Any]]:
    return [(await asyncio.wait_for(layer.receive(channel), 2))["event"] for _ in range(n)]


async def test_published_events_arrive_in_order() -> None:
    layer, channel = await _listen()
    for n in range(50):
        events.publish({"type": "t", "n": n})
    assert [e["n"] for e in await _received(layer, channel, 50)] == list(range(50))


def test_a_sender_stuck_on_a_closed_loop_does_not_swallow_later_events(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loop that ends with a send in flight (a finished test's, a restarted server's)
    # leaves its sender task behind, never to run again (here: until the test cleans up).
    async def never(event: dict[str, Any]) -> None:
        await asyncio.Event().wait()

    old = asyncio.new_event_loop()
    with monkeypatch.context() as patch:
        patch.setattr(events, "send", never)

        async def publish_and_leave() -> None:
            await _listen()  # someone hears the group: publish sends
            events.publish({"type": "t", "n": 0})
            await asyncio.sleep(0)  # the sender starts, and blocks
            events.publish({"type": "t", "n": 1})  # queued behind it, for this loop's pages

        old.run_until_complete(publish_and_leave())
    stuck = events._sender

    async def publish_here() -> list[dict[str, Any]]:
        layer, channel = await _listen()
        events.publish({"type": "t", "n": 2})
        events.publish({"type": "t", "n": 3})
        return await _received(layer, channel, 2)

    try:
        assert [e["n"] for e in asyncio.run(publish_here())] == [2, 3]
    finally:
        assert stuck is not None
        stuck.cancel()
        old.run_until_complete(asyncio.sleep(0))
        old.close()


async def test_a_full_queue_drops_and_counts(monkeypatch) -> None:
    """The sender cannot keep up (here: it gets no turn at all): past the bound, events are
    dropped and counted (hal0_events_dropped_total), never queued without end."""
    monkeypatch.setattr(events, "QUEUE_LIMIT", 10)
    layer, channel = await _listen()
    before = events.dropped()
    for n in range(25):  # no await between: the sender task never runs meanwhile
        events.publish({"type": "t", "n": n})
    assert events.dropped() - before == 15
    assert [e["n"] for e in await _received(layer, channel, 10)] == list(range(10))


async def test_an_event_nobody_can_hear_is_not_sent() -> None:
    """The in-memory layer is this process's alone: a group with no member here has none
    anywhere, and publishing to it costs nothing (no queue, no sender task, no layer sweep)."""
    layer = get_channel_layer()
    group = events.user_group("nobody-has-a-page-open")
    assert group not in layer.groups
    queued, sender = len(events._queue), events._sender
    events.publish({"type": "t", "n": 0}, group)
    assert len(events._queue) == queued and events._sender is sender
    channel = await layer.new_channel()
    await layer.group_add(group, channel)  # a page opens: it hears what comes next
    events.publish({"type": "t", "n": 1}, group)
    assert [e["n"] for e in await _received(layer, channel, 1)] == [1]
