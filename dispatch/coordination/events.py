"""The only module that talks to the channel layer: the bus.

Everything the live UI hears goes through here (built by the live feed, ``dispatch.web.live``):
decisions to the staff's pages and to the asking user's, in-flight counts to every page, table
changes to the pages of the process whose table changed. The processes' own messages ride it
too (a commit waking every version check, a poke for the watcher). Sends are fire and forget:
an event never delays or fails the request or the database write that caused it.

What pages hear travels in batches (issue 24: 500 pages under ~53 decisions/s cost the /v1
load a quarter of its throughput, and the channel layer dropped most decisions, silently).
Each process gathers its page events for ``BATCH_S`` and sends one message per group: N
pages cost N deliveries per batch, not per event. Every batch carries its stream (this
process and the group) and the count of events published to that group so far, so whoever
hears it (``Follower``) tells what was missed, wherever it was lost, and counts it
(``missed()``). Pages have no channel of their own: one per process hears their groups and
hands each page what it may see, one frame per tick (``_Hub``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

from dispatch.coordination.outages import REDIS

GROUP = "dispatch"
# Who may see which decision (issue 14): staff pages hear every one; any other user's pages
# hear only their own requests', in a group per user. A page joins one or the other, so what
# it must not see is never even sent to it (not sent and then filtered).
STAFF_GROUP = "dispatch.staff"
# Every process's version check listens here: a commit anywhere wakes it at once.
SYNC_GROUP = "hal0.sync"
# The leading watcher's ear: pokes from other processes (a request that failed there).
WATCHER_GROUP = "hal0.watcher"
# This process's own pages. A change to the table reaches every process
# (dispatch.coordination.sync), and each tells its own pages what its table now holds: sent
# to GROUP, a page would hear each change once from every process. Decisions are made once,
# by one process, so they go to GROUP for every page.
PROCESS = f"{os.getpid()}.{secrets.token_hex(4)}"
LOCAL_GROUP = f"dispatch.local.{PROCESS}"
# How often ``listen`` joins its group again (channels-redis forgets a member after a day).
REJOIN_S = 3600.0
log = logging.getLogger("hal0.events")

# The processes' messages published from async code wait here for the one task that sends
# them, in order (page events wait for their batch: below). Bounded, as the batches are: a
# channel layer that stalls (Redis away) must not grow memory without end; what does not fit
# is dropped and counted (hal0_events_dropped_total).
QUEUE_LIMIT = 10_000
_queue: deque[tuple[dict[str, Any], str]] = deque()
_dropped = 0


def dropped() -> int:
    """Events dropped because the send queue (or the pages' batches) was full, since the
    process started."""
    return _dropped


# How long a page event waits for others to go with it. A page shows what happened within
# this (plus the send), and N open pages cost N deliveries per batch instead of per event.
BATCH_S = 0.1
# Pages missed this many events, summed over this process's pages (hal0_events_missed).
_missed = 0


def missed() -> int:
    """Events this process's pages did not hear: gaps in their batches' counts, summed over
    the pages (one event lost for 500 pages counts 500), since the process started."""
    return _missed


_sender: asyncio.Task[None] | None = None
# The loop the server runs on. The in-memory layer's queues belong to it, so sends from
# other threads (the admin's sync views, the watcher's database writes) are handed to it.
_home: asyncio.AbstractEventLoop | None = None


def bind_loop(loop: asyncio.AbstractEventLoop) -> None:
    global _home
    _home = loop


def _message(event: dict[str, Any]) -> dict[str, Any]:
    # "type" routes the message to the consumer's handler; the event rides inside.
    return {"type": "dispatch.event", "event": event}


async def send(event: dict[str, Any], group: str = GROUP) -> None:
    await _group_send(group, _message(event), event.get("type"))


async def _group_send(group: str, message: dict[str, Any], what: object, events: int = 1) -> None:
    """One message to ``group`` (``events`` events: what is dropped if it cannot go)."""
    global _dropped
    layer = get_channel_layer()
    if layer is None:
        return
    redis = _on_redis(layer)
    if redis and not REDIS.available():  # away: dropped at once, not after a timeout each
        REDIS.missed()
        _dropped += events
        return
    try:
        await layer.group_send(group, message)
    except Exception as exc:  # a broken layer must not break routing; say so and go on
        if redis and isinstance(exc, REDIS.errors):  # once per outage, not per event
            REDIS.failed(f"could not broadcast {what}", exc)
            _dropped += events
        else:
            log.warning("could not broadcast %s", what, exc_info=True)
        return
    if redis:
        REDIS.ok()


class BusAway(Exception):
    """The channel layer (Redis) cannot be reached: a page cannot hear anything now."""


def _on_redis(layer: Any) -> bool:
    """Whether ``layer`` lives in Redis (outages.REDIS); the in-memory layer is this
    process's own and cannot be away."""
    return not isinstance(layer, InMemoryChannelLayer)


def user_group(username: str) -> str:
    """The group of one user's pages. Usernames may hold characters group names may not
    (``@``, ``+``, non-ASCII), so the name is hashed."""
    return "dispatch.user." + hashlib.sha256(username.encode()).hexdigest()[:32]


def publish_decision(event: dict[str, Any], client: str | None) -> None:
    """A decision for the staff's pages and, when a page user asked, for that user's."""
    tell_pages(event, STAFF_GROUP)
    if client is not None and client.startswith("user:"):
        tell_pages(event, user_group(client.removeprefix("user:")))


def decision_heard(client: str | None) -> bool:
    """Whether a page may hear the decision ``client`` asked for (``publish_decision``'s
    groups). False only on the in-memory layer with none of them open: then its event need
    not even be built (issue 23: per request, with no page open, the default)."""
    if not isinstance(get_channel_layer(), InMemoryChannelLayer):
        return True
    hub = _hub
    if hub is None or not hub.members:  # no page at all: the usual case, one check
        return False
    if hub.members.get(STAFF_GROUP):
        return True
    return (
        client is not None
        and client.startswith("user:")
        and bool(hub.members.get(user_group(client.removeprefix("user:"))))
    )


def _unheard(group: str) -> bool:
    """Whether nobody anywhere can hear ``group``: the in-memory layer is this process's
    alone, so a group with no member here has none at all (the embedded default, no page
    open). Sending to it anyway made a task and a clean-up sweep of the layer per request
    (bench/served.py: ~4 % of a request's instructions). Any other layer is asked."""
    layer = get_channel_layer()
    return isinstance(layer, InMemoryChannelLayer) and group not in layer.groups


def _no_page_hears(group: str) -> bool:
    """On the in-memory layer, whether no page hears ``group``: this process's pages are
    the only ones, and its hub stays in a group its last page has left."""
    if not isinstance(get_channel_layer(), InMemoryChannelLayer):
        return False
    hub = _hub
    return hub is None or not hub.members.get(group)


def publish(event: dict[str, Any], group: str = GROUP) -> None:
    """From async code: queue the send and return at once (a message for the processes;
    pages hear ``tell_pages``).

    One task sends whatever is queued, oldest first, and ends when the queue is empty: under
    load a burst of events costs one task, not one each (one per request, on /v1).
    """
    global _sender, _dropped
    if _unheard(group):
        return
    loop = asyncio.get_running_loop()
    if _sender is not None and _sender.get_loop() is not loop:
        # A sender left on another loop (a finished test's, a restarted server's) will never
        # run again, and what it had queued was for the pages that loop served.
        _queue.clear()
        _sender = None
    if len(_queue) >= QUEUE_LIMIT:
        _dropped += 1
        return
    _queue.append((event, group))
    if _sender is None or _sender.done():
        _sender = loop.create_task(_send_queued())


async def _send_queued() -> None:
    while _queue:
        await send(*_queue.popleft())


# --- what pages hear: batches ------------------------------------------------------------------


class _Batches:
    """Page events waiting for their batch, per group, on one loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[str, list[dict[str, Any]]] = {}
        self.held = 0
        self.pump: asyncio.Task[None] | None = None
        # Held while a batch is taken and sent: batches of one group leave in their order.
        self.lock = asyncio.Lock()


_batches: _Batches | None = None
# Per group, the events this process published to it, sent or dropped: each batch carries
# the count through its last event, so a page that hears the next batch knows what it missed.
_published: dict[str, int] = {}


def tell_pages(event: dict[str, Any], group: str = GROUP) -> None:
    """From async code: ``event`` goes to ``group``'s pages with this process's next batch
    (within ``BATCH_S``). Returns at once."""
    global _batches, _dropped
    if _no_page_hears(group):
        return
    loop = asyncio.get_running_loop()
    batches = _batches
    if batches is None or batches.loop is not loop:
        # Batches left on another loop (a finished test's, a restarted server's) would never
        # leave, and were for the pages that loop served.
        batches = _batches = _Batches(loop)
    _published[group] = _published.get(group, 0) + 1
    if batches.held >= QUEUE_LIMIT:
        _dropped += 1  # counted here, and every page of the group sees the gap
        return
    batches.waiting.setdefault(group, []).append(event)
    batches.held += 1
    if batches.pump is None or batches.pump.done():
        batches.pump = loop.create_task(_pump(batches))


async def _pump(batches: _Batches) -> None:
    # Ends when nothing waits: an idle process runs no timer.
    while batches.waiting:
        await asyncio.sleep(BATCH_S)
        await _flush(batches)


async def _flush(batches: _Batches) -> None:
    """Send what waits: one message per group."""
    async with batches.lock:
        waiting, batches.waiting, batches.held = batches.waiting, {}, 0
        # Taken with the events, before any await: the count through the batch's last event.
        counts = {group: _published[group] for group in waiting}
        for group, evs in waiting.items():
            message = batch_message(group, counts[group], evs)
            await _group_send(group, message, f"a batch of {len(evs)} events", len(evs))


def batch_message(
    group: str, count: int, evs: list[dict[str, Any]], stream: str | None = None
) -> dict[str, Any]:
    """A batch as the channel layer carries it: its events, and ``count``, how many events
    its stream (this process's, to ``group``, unless another is named) published through
    the last of them."""
    return {
        "type": "dispatch.batch",
        "stream": stream or f"{PROCESS} {group}",
        "group": group,
        "count": count,
        "events": evs,
    }


async def _tell_pages_now(event: dict[str, Any], group: str) -> None:
    # From sync code with no server loop to hand it to: this loop may end when this returns,
    # so what waits on it leaves now.
    tell_pages(event, group)
    batches = _batches
    if batches is not None and batches.loop is asyncio.get_running_loop():
        await _flush(batches)


class Follower:
    """What this process has heard of each stream of batches (one process's, to one group).

    A batch's count says how many events its stream had published through its last one;
    the next batch heard should start right after the last one heard. A gap is what was
    missed, wherever it was lost (a full send queue, the channel layer, Redis away): the
    pages of the group are told, and it is counted (``missed()``). The first batch heard of
    a stream starts its count: what was sent before anyone here listened is not missed.
    """

    def __init__(self) -> None:
        self._heard: dict[str, int] = {}

    def follow(self, batch: Mapping[str, Any]) -> tuple[list[dict[str, Any]], int]:
        """The batch's events not heard yet, and how many were missed before them."""
        stream, count, evs = batch["stream"], batch["count"], batch["events"]
        last = self._heard.get(stream)
        if last is not None and count <= last:
            return [], 0  # heard already: a layer may deliver a message twice
        self._heard[stream] = count
        first = count - len(evs)  # the count before the batch's first event
        if last is None:
            return evs, 0
        if first < last:
            return evs[last - first :], 0
        return evs, first - last


def tell_own_pages(event: dict[str, Any]) -> None:
    """From sync code (after a reload): to this process's pages, with the next batch."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None and (running is _home or _home is None):
        tell_pages(event, LOCAL_GROUP)
    elif _home is not None and _home.is_running():
        _home.call_soon_threadsafe(tell_pages, event, LOCAL_GROUP)
    else:
        async_to_sync(_tell_pages_now)(event, LOCAL_GROUP)


def tell_every_process(event: dict[str, Any]) -> None:
    """From sync code (after a commit): wake every process's version check at once."""
    send_from_sync(event, SYNC_GROUP)


def send_from_sync(event: dict[str, Any], group: str) -> None:
    """Send from sync code, bridging into the server's event loop when one runs."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is not None and (running is _home or _home is None):
        publish(event, group)  # already on the loop: schedule, don't block it
    elif _home is not None and _home.is_running():
        # Into the one send queue, in order: a coroutine each, a reload that changed 200
        # slots sent 200 at once and ran redis-py's pool (100 connections) dry.
        _home.call_soon_threadsafe(publish, event, group)
    else:
        async_to_sync(send)(event, group)


def _page_groups(staff: bool, username: str) -> tuple[str, ...]:
    return (GROUP, LOCAL_GROUP, STAFF_GROUP if staff else user_group(username))


# --- what this process's pages hear ------------------------------------------------------------

# Each page gets at most one frame this often, whatever the number of groups and processes
# it hears from: what arrives meanwhile waits for the next (bench/crowds.py: a frame per
# page costs a socket write each, and 500 pages at 10 frames/s cost the /v1 load ~8 %).
TICK_S = 0.25
# After a quiet spell, what arrives is handed on this soon: the batches one process sends
# together (one per group) arrive within it and go out in one frame.
GATHER_S = 0.02
SLICE = 50


class Delivery:
    """What one tick brings the pages of one audience (pages in the same groups): the events
    they have not heard, and how many they missed before them. ``text`` is the page's to
    keep: what it sends, made by the first page of the audience for all of them."""

    __slots__ = ("events", "missed", "text")

    def __init__(self, events: list[dict[str, Any]], missed: int) -> None:
        self.events, self.missed = events, missed
        self.text: str | None = None


class Page(Protocol):
    def hear(self, delivery: Delivery) -> None:
        """On the loop, for every tick that brings the page something. Must return at once:
        a page that cannot keep up queues, and falls behind alone."""

    def away(self) -> None:
        """On the loop: the layer (Redis) went away, the page hears nothing any more (it is
        no longer a member). Must return at once."""


class _Hub:
    """This process's pages by group, and the one channel that hears their groups for them.

    A page has no channel of its own: a channel per page cost a Redis round trip or more to
    connect (1,000 pages at once exhausted the pool), and a delivery per page per message
    through Channels (a consumer closes old database connections in a thread before every
    message it handles). The hub's channel joins a group when the first page here needs it
    and stays (joined again every ``REJOIN_S``), hears each batch once, and every ``TICK_S``
    hands each page one delivery with what its groups brought."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.channel: str | None = None
        self.joined: set[str] = set()
        self.joining = asyncio.Lock()
        self.members: dict[str, set[Page]] = {}
        self.pages: dict[Page, tuple[str, ...]] = {}
        self.follower = Follower()
        self.pending: dict[str, tuple[list[dict[str, Any]], list[int]]] = {}
        self.tick: asyncio.TimerHandle | None = None
        self.delivered_at = 0.0
        self.receiver: asyncio.Task[None] | None = None

    async def join(self, group: str) -> None:
        """This process hears ``group`` (at once when it does). BusAway when the layer
        (Redis) is away: checked first, so a page connecting during an outage is paused
        even when its groups are heard already."""
        layer = get_channel_layer()
        if layer is None:
            return
        redis = _on_redis(layer)
        if redis and not REDIS.available():
            REDIS.missed()
            raise BusAway
        if group in self.joined:
            return
        async with self.joining:
            if group in self.joined:
                return
            try:
                if self.channel is None:
                    self.channel = await layer.new_channel()
                await layer.group_add(group, self.channel)
            except REDIS.errors as exc:
                if not redis:
                    raise
                REDIS.failed("a page could not join the live feed", exc)
                raise BusAway from exc
            if redis:
                REDIS.ok()
            self.joined.add(group)
            if self.receiver is None or self.receiver.done():
                self.receiver = self.loop.create_task(self._receive(layer, self.channel))

    async def _receive(self, layer: Any, channel: str) -> None:
        redis = _on_redis(layer)
        while True:
            rejoin = asyncio.timeout(REJOIN_S)
            try:
                async with rejoin:
                    while True:
                        message = await layer.receive(channel)
                        if message.get("type") == "dispatch.batch":
                            self.heard(message)
            except REDIS.errors as exc:
                if not rejoin.expired():
                    if not redis:
                        raise
                    # Every page here is paused (closed with the code the page reads as
                    # such: it connects again, refused until Redis is back); this channel
                    # hears again once Redis is back (its probe says when).
                    REDIS.failed("the pages' live feed stopped", exc)
                    self.away()
                    await REDIS.back()
            # Joined again now and then (channels-redis forgets a member after a day), and
            # after an outage (a Redis that restarted has forgotten every group).
            try:
                for group in list(self.joined):
                    await layer.group_add(group, channel)
            except REDIS.errors as exc:
                if not redis:
                    raise
                REDIS.failed("the pages' live feed could not join its groups", exc)
                await REDIS.back()

    def away(self) -> None:
        """The layer is away: every page here hears nothing now, and is told so."""
        pages, self.pages, self.members, self.pending = self.pages, {}, {}, {}
        for page in pages:
            page.away()

    def heard(self, batch: Mapping[str, Any]) -> None:
        new, missed = self.follower.follow(batch)
        group = batch.get("group")
        if not (new or missed) or group not in self.members:
            return
        pending = self.pending.get(group)
        if pending is None:
            pending = self.pending[group] = ([], [0])
        pending[0].extend(new)
        pending[1][0] += missed
        if self.tick is None:
            now = self.loop.time()
            self.tick = self.loop.call_at(
                max(now + GATHER_S, self.delivered_at + TICK_S), self.deliver
            )

    def deliver(self) -> None:
        self.tick, self.delivered_at = None, self.loop.time()
        pending, self.pending = self.pending, {}
        made: dict[tuple[str, ...], Delivery | None] = {}
        for groups in set(self.pages.values()):
            evs: list[dict[str, Any]] = []
            missed = 0
            for group in groups:
                if group in pending:
                    evs.extend(pending[group][0])
                    missed += pending[group][1][0]
            made[groups] = Delivery(evs, missed) if evs or missed else None
        self._hand_out(list(self.pages.items()), made, 0)

    def _hand_out(
        self,
        pages: list[tuple[Page, tuple[str, ...]]],
        made: dict[tuple[str, ...], Delivery | None],
        start: int,
    ) -> None:
        # A slice of the pages per turn of the loop: each page heard sends a frame at the next
        # turn, and between turns the loop reads its sockets. All 500 pages' frames in one
        # turn held requests back ~10 ms every tick (bench/crowds.py).
        global _missed
        for page, groups in pages[start : start + SLICE]:
            delivery = made.get(groups)
            if delivery is not None:
                _missed += delivery.missed
                page.hear(delivery)
        if start + SLICE < len(pages):
            self.loop.call_soon(self._hand_out, pages, made, start + SLICE)


_hub: _Hub | None = None


def _hub_here() -> _Hub:
    global _hub
    loop = asyncio.get_running_loop()
    if _hub is None or _hub.loop is not loop:
        # A hub left on another loop (a finished test's, a restarted server's) served that
        # loop's pages; its receiver will never run again.
        _hub = _Hub(loop)
    return _hub


async def join(page: Page, *, staff: bool, username: str) -> None:
    """A page joins: from now on it hears the in-flight counts, the table changes of its own
    process, and every decision (staff) or its user's own, through ``page.hear``. Returns
    once this process hears all that; BusAway when the layer (Redis) is away."""
    hub = _hub_here()
    groups = _page_groups(staff, username)
    for group in groups:
        await hub.join(group)
    hub.pages[page] = groups
    for group in groups:
        hub.members.setdefault(group, set()).add(page)


async def leave(page: Page) -> None:
    hub = _hub
    if hub is None:
        return
    for group in hub.pages.pop(page, ()):
        members = hub.members.get(group)
        if members is not None:
            members.discard(page)
            if not members:
                del hub.members[group]


def forget_pages() -> None:
    """Forget this process's pages and their batches (a new server loop, a test's)."""
    global _hub, _batches
    _hub = _batches = None


def count_missed(n: int) -> None:
    """A page fell so far behind that it let ``n`` events go (hal0_events_missed)."""
    global _missed
    _missed += n


async def listen(group: str, handle: Callable[[dict[str, Any]], None]) -> None:
    """Hear what is sent to ``group`` until cancelled; ``handle`` gets each event."""
    layer = get_channel_layer()
    if layer is None:
        return
    redis = _on_redis(layer)
    channel = await layer.new_channel()
    try:
        while True:
            rejoin = asyncio.timeout(REJOIN_S)
            try:
                # Joined again now and then: channels-redis forgets a member after a day,
                # and a Redis that was away may have forgotten everything.
                await layer.group_add(group, channel)
                if redis:
                    REDIS.ok()
                async with rejoin:
                    while True:
                        message = await layer.receive(channel)
                        handle(message.get("event") or {})
            except REDIS.errors as exc:
                if rejoin.expired():
                    continue
                if not redis:
                    raise
                # Heard again once Redis is back (its probe says when): never a dead task.
                REDIS.failed(f"could not hear {group}", exc)
                await REDIS.back()
    finally:
        try:
            await layer.group_discard(group, channel)
        except Exception:  # the layer may be gone with the loop; nothing is left to undo
            log.debug("could not leave %s", group, exc_info=True)
