"""The live feed: every event a page hears after its snapshot is built here.

The rooms below know nothing of pages. Each keeps a listener list for what it changes: the
table store ("the table changed from old to new"), admission ("a slot's in-flight count
changed"), outliers ("an ejection began or ended"), the decisions ("a decision was
recorded") and sync ("the table turned stale, or fresh again"; "the leading loader says
what it loads, evicts and keeps waiting"). ``install`` subscribes this
module to all of them, once, from ``DispatchConfig.ready``; each listener builds the event
the page script expects and hands it to ``dispatch.coordination.events``, the bus, which
sends a page's events in batches (``batch_event`` is what the page gets of one).

The builders are pure (the same inputs give the same events), so the WebSocket's deltas and
the tests agree by construction. The snapshot a page gets on connecting is the consumer's
answer (``dispatch.web.snapshots``), not an event of this feed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dispatch.coordination import events, sync
from dispatch.coordination.store import store
from dispatch.observability import decisions
from dispatch.observability.decisions import DecisionRecord
from dispatch.routing import slot_fields, states
from dispatch.routing.table import RoutingTable, SlotEntry
from dispatch.upstream.admission import admission
from dispatch.upstream.outliers import outliers
from dispatch.web.snapshots import Overlay, shown, slot_payload

Event = dict[str, Any]


# --- the table: what a page that showed one table needs to hear to show the next ----------


def table_events(
    old: RoutingTable,
    new: RoutingTable,
    inflight: Mapping[str, int],
    overlay: Overlay | None = None,
) -> list[Event]:
    """What a UI that showed ``old`` needs to hear to show ``new``, most specific first."""
    over = overlay or {}
    found: list[Event] = []
    # Both ends, so a page can tell a stale event (to an older version) from a gap (from a
    # version after the one it holds).
    versions = {"from_version": old.version, "version": new.version}
    for name in old.slots.keys() - new.slots.keys():
        found.append({"type": "slot.deleted", **versions, "slot": name})
    for name, slot in new.slots.items():
        before = old.slots.get(name)
        if before == slot:
            continue
        payload = slot_payload(slot, inflight.get(name, 0), over.get(name))
        kind = "slot.updated" if before is None else _change_kind(before, slot)
        if kind == "slot.state":
            assert before is not None
            payload["previous_state"] = shown(before, over.get(name))[0]
        found.append({"type": kind, **versions, "slot": payload})
    return found


def _change_kind(before: SlotEntry, slot: SlotEntry) -> str:
    """The narrowest event that tells the change: its state, its models, or the whole slot
    (anything else, or state and models at once)."""
    changed_state = (before.state, before.enabled, before.last_error) != (
        slot.state,
        slot.enabled,
        slot.last_error,
    )
    changed_models = _models_key(before) != _models_key(slot)
    if _without(before) != _without(slot) or (changed_state and changed_models):
        return "slot.updated"
    if changed_models:
        return "slot.models"
    return "slot.state"


def _models_key(slot: SlotEntry) -> tuple[Any, ...]:
    return (slot.default_model, tuple(sorted(slot.models.items())), slot.drift)


# The table fields whose change is a `slot.state` (state, enabled, last_error) or a
# `slot.models` (drift, with the models); a change in any other is a `slot.updated`.
_STATE_OR_MODELS = frozenset({"name", "state", "enabled", "last_error", "drift"})
_REST = tuple(f.name for f in slot_fields.TABLE if f.name not in _STATE_OR_MODELS)


def _without(slot: SlotEntry) -> tuple[Any, ...]:
    """The slot without its state and models: a change here is a ``slot.updated``."""
    return tuple(getattr(slot, name) for name in _REST)


# --- the other events ------------------------------------------------------------------------


def ejection_event(
    table: RoutingTable, name: str, inflight: Mapping[str, int], overlay: Overlay
) -> Event | None:
    """An ejection of ``name`` began or ended: the table did not change, so its state shows
    through the overlay. None when the table no longer holds the slot."""
    slot = table.slots.get(name)
    if slot is None:
        return None
    over = overlay.get(name)
    payload = slot_payload(slot, inflight.get(name, 0), over)
    payload["previous_state"] = slot.state if over is not None else states.DEGRADED
    versions = {"from_version": table.version, "version": table.version}
    return {"type": "slot.state", **versions, "slot": payload}


def decision_event(data: Mapping[str, object]) -> Event:
    """A recorded decision (``DecisionRecord.as_dict``), as the pages show it live."""
    return {"type": "dispatch.decision", **data}


def batch_event(events: list[Event], missed: int) -> Event:
    """What a page gets every tick something happened (``dispatch.coordination.events``):
    the events it has not heard yet, and how many it missed before them, which it shows."""
    return {"type": "batch", "missed": missed, "events": events}


def inflight_event(counts: Mapping[str, int]) -> Event:
    return {"type": "slot.inflight", "inflight": dict(counts)}


def watcher_event(freshness: Mapping[str, object]) -> Event:
    """Whether the slot states are fresh (``TableStore.freshness``)."""
    return {"type": "watcher", **freshness}


def queue_event(news: Mapping[str, Any]) -> Event:
    """The leading loader's news of one slot (``dispatch.coordination.sync.loads_news``), as
    the pages show it: the model it loads and how far, the one it evicts, and the requests
    waiting, in order (``position`` counts from 1). Which load failed for whom stays out:
    the waiting request hears that itself, in its answer."""
    queue = news.get("queue") or []
    # The news names the model it loads by that model's load state (`loading`), as the page
    # event does.
    return {
        "type": "queue",
        "slot": news.get("slot"),
        states.LOAD_LOADING: news.get(states.LOAD_LOADING),
        "progress": news.get("progress"),
        "evicting": news.get("evicting"),
        "queue": [
            {
                "ticket": w.get("ticket"),
                "model": w.get("model"),
                "since": w.get("since"),
                "position": i,
            }
            for i, w in enumerate(queue, 1)
            if isinstance(w, Mapping)
        ],
        "at": news.get("at"),
    }


class LoaderNews:
    """The latest ``queue`` event per slot, for the snapshot of a page that connects while a
    load or a wait is under way; a slot whose loader is idle again is forgotten."""

    def __init__(self) -> None:
        self._latest: dict[str, Event] = {}

    def note(self, event: Event) -> None:
        slot = event.get("slot")
        if not isinstance(slot, str):
            return
        if event[states.LOAD_LOADING] or event["evicting"] or event["queue"]:
            self._latest[slot] = event
        else:
            self._latest.pop(slot, None)

    def latest(self, slots: Iterable[str] | None = None) -> list[Event]:
        """What is under way, for the slots still in the table (all when not given)."""
        keep = None if slots is None else set(slots)
        return [e for name, e in self._latest.items() if keep is None or name in keep]

    def clear(self) -> None:
        self._latest.clear()


class InflightReporter:
    """Tells the pages how busy each slot is, at most every ``interval`` seconds.

    Under load counts change thousands of times a second; the page needs a few updates a
    second, so changes are gathered and sent as one `slot.inflight` event per interval.
    """

    def __init__(
        self,
        counts: Mapping[str, int],
        interval: float = 0.1,
        send: Callable[[Event], None] = events.tell_pages,
    ) -> None:
        self._counts = counts
        self._interval = interval
        self._dirty: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._send = send

    def note(self, slot: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._dirty.add(slot)  # the next note on a loop sends it
            return
        if self._timer_loop is not loop:
            if self._timer_loop is not None:
                # A timer left on another (stopped) loop never fires, and what it gathered
                # was for the pages that loop served: start afresh on this one.
                self._dirty.clear()
            self._timer, self._timer_loop = None, loop
        self._dirty.add(slot)
        if self._timer is None:
            self._timer = loop.call_later(self._interval, self._flush)

    def _flush(self) -> None:
        self._timer = None
        dirty, self._dirty = self._dirty, set()
        self._send(inflight_event({s: self._counts.get(s, 0) for s in sorted(dirty)}))


# --- the listeners, and the one place they are subscribed ------------------------------------


def _table_changed(old: RoutingTable, new: RoutingTable) -> None:
    # Every process reloads each change (dispatch.coordination.sync) and tells its own pages.
    for event in table_events(old, new, admission.inflight, outliers.overlay()):
        events.tell_own_pages(event)


def _ejection_changed(name: str) -> None:
    # An ejection this process decided, before its table carries it (or while the database
    # refuses it): its own pages hear it. Once in the table, every process tells its own
    # pages through _table_changed, as any change.
    event = ejection_event(store.table, name, admission.inflight, outliers.overlay())
    if event is not None:
        events.tell_own_pages(event)


def _decided(rec: DecisionRecord) -> None:
    # Who asked decides who hears it: staff see every decision, a page user their own. With
    # none of them listening the event is not built at all.
    if events.decision_heard(rec.client):
        events.publish_decision(decision_event(rec.data()), rec.client)


def _freshness_changed(freshness: Mapping[str, object]) -> None:
    events.tell_own_pages(watcher_event(freshness))


def _loader_said(news: Mapping[str, Any]) -> None:
    # Every process hears the leading loader (dispatch.coordination.sync) and tells its own
    # pages, as with table changes: each page hears it once.
    if not isinstance(news.get("slot"), str):
        return
    event = queue_event(news)
    loader_news.note(event)
    events.tell_own_pages(event)


_inflight = InflightReporter(admission.inflight)
loader_news = LoaderNews()
_installed = False


def install() -> None:
    """Subscribe the feed to the rooms it reports on; once per process (later calls do
    nothing, so a page never hears an event twice)."""
    global _installed
    if _installed:
        return
    _installed = True
    store.on_change(_table_changed)
    outliers.on_change(_ejection_changed)
    admission.on_change(_inflight.note)
    decisions.recorded.add(_decided)
    sync.freshness_changed.add(_freshness_changed)
    sync.loads_news.add(_loader_said)
