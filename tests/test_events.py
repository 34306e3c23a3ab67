"""The bus: the processes' messages reach their group in order, whatever loop; what pages hear
goes in batches, handed to each page once a tick, and what is lost on the way is counted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import get_channel_layer

from dispatch.coordination import events
from tests.live import Heard


async def _listen(group: str = events.SYNC_GROUP) -> tuple[Any, str]:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(group, channel)
    return layer, channel


async def _received(layer: Any, channel: str, n: int) -> list[dict[str, Any]]:
    return [(await asyncio.wait_for(layer.receive(channel), 2))["event"] for _ in range(n)]


# --- the processes' messages: one at a time, in order -----------------------------------------


async def test_published_messages_arrive_in_order() -> None:
    layer, channel = await _listen()
    for n in range(50):
        events.publish({"type": "t", "n": n}, events.SYNC_GROUP)
    assert [e["n"] for e in await _received(layer, channel, 50)] == list(range(50))


def test_a_sender_stuck_on_a_closed_loop_does_not_swallow_later_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loop that ends with a send in flight (a finished test's, a restarted server's)
    # leaves its sender task behind, never to run again (here: until the test cleans up).
    async def never(event: dict[str, Any], group: str) -> None:
        await asyncio.Event().wait()

    old = asyncio.new_event_loop()
    with monkeypatch.context() as patch:
        patch.setattr(events, "send", never)

        async def publish_and_leave() -> None:
            await _listen()  # someone hears the group: publish sends
            events.publish({"type": "t", "n": 0}, events.SYNC_GROUP)
            await asyncio.sleep(0)  # the sender starts, and blocks
            events.publish({"type": "t", "n": 1}, events.SYNC_GROUP)  # queued behind it

        old.run_until_complete(publish_and_leave())
    stuck = events._sender

    async def publish_here() -> list[dict[str, Any]]:
        layer, channel = await _listen()
        events.publish({"type": "t", "n": 2}, events.SYNC_GROUP)
        events.publish({"type": "t", "n": 3}, events.SYNC_GROUP)
        return await _received(layer, channel, 2)

    try:
        assert [e["n"] for e in asyncio.run(publish_here())] == [2, 3]
    finally:
        assert stuck is not None
        stuck.cancel()
        old.run_until_complete(asyncio.sleep(0))
        old.close()


async def test_a_full_queue_drops_and_counts(monkeypatch) -> None:
    """The sender cannot keep up (here: it gets no turn at all): past the bound, messages are
    dropped and counted (hal0_events_dropped_total), never queued without end."""
    monkeypatch.setattr(events, "QUEUE_LIMIT", 10)
    layer, channel = await _listen()
    before = events.dropped()
    for n in range(25):  # no await between: the sender task never runs meanwhile
        events.publish({"type": "t", "n": n}, events.SYNC_GROUP)
    assert events.dropped() - before == 15
    assert [e["n"] for e in await _received(layer, channel, 10)] == list(range(10))


async def test_a_message_nobody_can_hear_is_not_sent() -> None:
    """The in-memory layer is this process's alone: a group with no member here has none
    anywhere, and publishing to it costs nothing (no queue, no sender task, no layer sweep)."""
    layer = get_channel_layer()
    group = "hal0.nobody-listens-here"
    assert group not in layer.groups
    queued, sender = len(events._queue), events._sender
    events.publish({"type": "t", "n": 0}, group)
    assert len(events._queue) == queued and events._sender is sender
    layer, channel = await _listen(group)  # someone listens: it hears what comes next
    events.publish({"type": "t", "n": 1}, group)
    assert [e["n"] for e in await _received(layer, channel, 1)] == [1]


# --- what pages hear: batches, one delivery per page per tick ----------------------------------


async def test_page_events_arrive_in_order_in_few_deliveries() -> None:
    page = Heard()
    await events.join(page, staff=True, username="op")
    for n in range(50):  # a burst: one batch, one delivery (two, should a tick fall between)
        events.tell_pages({"type": "t", "n": n})
    await page.until(50)
    assert [e["n"] for e in page.events] == list(range(50))
    assert len(page.deliveries) <= 2
    assert page.missed == 0


async def test_a_page_hears_all_its_groups_in_one_delivery_and_others_not() -> None:
    op, ann, bob = Heard(), Heard(), Heard()
    await events.join(op, staff=True, username="op")
    await events.join(ann, staff=False, username="ann")
    await events.join(bob, staff=False, username="bob")
    events.tell_pages({"type": "t", "n": "every page"})
    events.tell_own_pages({"type": "t", "n": "this process's pages"})
    events.publish_decision({"type": "t", "n": "ann's"}, "user:ann")
    events.publish_decision({"type": "t", "n": "nobody's"}, None)
    await op.until(4)
    await ann.until(3)
    await bob.until(2)
    await asyncio.sleep(events.TICK_S + 0.1)  # nothing else comes
    assert len(op.deliveries) == 1  # its groups' batches, handed over together
    assert sorted(e["n"] for e in op.events) == sorted(
        ["every page", "this process's pages", "ann's", "nobody's"]
    )
    assert sorted(e["n"] for e in ann.events) == sorted(
        ["every page", "this process's pages", "ann's"]
    )
    assert sorted(e["n"] for e in bob.events) == sorted(["every page", "this process's pages"])


async def test_a_decision_is_heard_only_where_a_page_would_hear_it() -> None:
    # Whether its event is built at all (dispatch.web.live): not when no page would hear it.
    assert not events.decision_heard(None) and not events.decision_heard("user:ann")
    ann = Heard()
    await events.join(ann, staff=False, username="ann")
    assert events.decision_heard("user:ann")
    assert not events.decision_heard("user:bob") and not events.decision_heard(None)
    assert not events.decision_heard("key:ann")  # an API key's name is no page user
    await events.join(Heard(), staff=True, username="op")
    assert events.decision_heard(None) and events.decision_heard("user:bob")


async def test_a_page_that_left_hears_nothing_more() -> None:
    page, other = Heard(), Heard()
    await events.join(page, staff=True, username="op")
    await events.join(other, staff=True, username="op2")
    events.tell_pages({"type": "t", "n": 0})
    await page.until(1)
    await events.leave(page)
    events.tell_pages({"type": "t", "n": 1})
    await other.until(2)
    assert [e["n"] for e in page.events] == [0]


async def test_full_batches_drop_count_and_tell_every_page_how_many(monkeypatch) -> None:
    """Past the bound, page events are dropped and counted (hal0_events_dropped_total); the
    next batch's count shows the gap, and each page of the group is told how many it missed
    (hal0_events_missed_total counts them per page)."""
    pages = [Heard(), Heard()]
    for page in pages:
        await events.join(page, staff=True, username="op")
    events.tell_pages({"type": "t", "n": -1})  # heard: the stream's count starts here
    for page in pages:
        await page.until(1)
    monkeypatch.setattr(events, "QUEUE_LIMIT", 10)
    dropped, missed = events.dropped(), events.missed()
    for n in range(25):  # no await between: nothing leaves meanwhile
        events.tell_pages({"type": "t", "n": n})
    assert events.dropped() - dropped == 15
    for page in pages:
        await page.until(11, missed=15)
        assert [e["n"] for e in page.events] == [-1, *range(10)]
        assert page.missed == 15
    assert events.missed() - missed == 30  # 15 for each of the two pages


async def test_no_batch_for_a_group_no_page_here_hears() -> None:
    """On the in-memory layer a group no page of this process is in has no page anywhere:
    telling it costs nothing (no batch, no task)."""
    batches = events._batches
    waiting = dict(batches.waiting) if batches is not None else {}
    events.tell_pages({"type": "t"}, events.user_group("nobody-has-a-page-open"))
    after = events._batches
    assert (dict(after.waiting) if after is not None else {}) == waiting


def test_a_stream_followed_gap_by_gap() -> None:
    follower = events.Follower()
    batch = events.batch_message

    def follow(count: int, ns: list[int]) -> tuple[list[int], int]:
        new, missed = follower.follow(batch("g", count, [{"n": n} for n in ns], "p g"))
        return [e["n"] for e in new], missed

    assert follow(3, [2, 3]) == ([2, 3], 0)  # the first heard starts the count
    assert follow(5, [4, 5]) == ([4, 5], 0)
    assert follow(5, [4, 5]) == ([], 0)  # the same batch again: heard already
    assert follow(9, [8, 9]) == ([8, 9], 2)  # 6 and 7 never came
    assert follow(10, [8, 9, 10]) == ([10], 0)  # only what is new
    # Another stream (another process, or another group) has a count of its own.
    new, missed = follower.follow(batch("g", 100, [{"n": 100}], "q g"))
    assert (new, missed) == ([{"n": 100}], 0)
