"""A request for a model its slot has not loaded: ask the leading process's loader for it,
wait in the slot's queue with every other process's requests, and say how the wait goes.

One process decides a slot's loads and evictions (``dispatch.lifecycle.loader``, in the
process that leads the watcher); every process's requests reach it over the channel layer:

- ``load``: a request waits for a model (its ticket, sent again every ``RESEND_S`` while it
  waits, so a message lost or a leader changed costs seconds, not the request);
- ``unwait``: it stopped waiting (served, failed, gone);
- ``usage``: this process's requests in flight per slot and model, and when each model was
  last used, sent when they change: within ``BUSY_EVERY_S`` when a model turns busy, else
  at most every ``USAGE_EVERY_S``: the loader never evicts a busy model, and evicts the
  least recently used.

The loader answers through the database (a model's load state, as every state) and its news
(``dispatch.coordination.sync.loads_news``: the queue in order, the progress, a failure by
ticket), which every process hears; a waiting request reads its place in the queue from it.
Only slots whose server loads models when asked (``SlotEntry.loads_models``) take this path:
a request for a loaded model costs two dict updates.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from dispatch.coordination import events
from dispatch.coordination.store import store
from dispatch.lib.listeners import Listeners
from dispatch.routing import states
from dispatch.routing.table import ModelEntry, SlotEntry
from dispatch.wire.errors import ApiError

RESEND_S = 2.0
USAGE_EVERY_S = 0.5
# A model turning busy is reported this soon (so an eviction need wait no longer than this to
# hear of every request on it), yet a busy process sends at most one report per interval.
BUSY_EVERY_S = 0.05
# This process, as the loader knows it (its usage reports replace each other).
WORKER = events.LOCAL_GROUP


@dataclass(frozen=True, slots=True)
class Waiting:
    """How a waiting request's wait goes: what it is told (SSE comments) and the page shows."""

    slot: str
    model: str
    position: int | None  # 1 = next; None: the loader has not placed it yet
    reason: str  # loading | evicting | queued
    progress: float | None  # of the load under way, 0..1, when the server tells it
    waited_s: float

    def comment(self) -> bytes:
        """The SSE comment line for it: ignored by every SSE client, kept alive by proxies."""
        parts = [f"position={self.position}" if self.position else "position=?"]
        parts += [f"reason={self.reason}", f"model={self.model}"]
        if self.progress is not None:
            parts.append(f"progress={round(self.progress * 100)}")
        parts.append(f"waited_s={self.waited_s:.0f}")
        return (": hal0 queued " + " ".join(parts) + "\n\n").encode()


def _failed(slot: SlotEntry, model: ModelEntry, reason: str) -> ApiError:
    return ApiError(
        502,
        "model_load_failed",
        f"Slot '{slot.name}' could not load '{model.model_id}': {reason}",
    )


def _timed_out(slot: SlotEntry, model: ModelEntry, wait: float, reason: str) -> ApiError:
    return ApiError(
        503,
        "slot_loading",
        f"Slot '{slot.name}' did not have '{model.model_id}' loaded within {wait:g}s "
        f"({reason}); try again shortly.",
        headers={"Retry-After": str(max(1, min(int(wait), 10)))},
    )


class Loads:
    def __init__(self) -> None:
        self.reset()
        # Told (slot, model id, seconds) when a request's wait for a model ends, served.
        self.waited: Listeners[[str, str, float]] = Listeners("the load waits")

    def reset(self) -> None:
        self._news: dict[str, dict[str, Any]] = {}
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        # (slot, upstream model) -> requests in flight here; and when last used (epoch s).
        self._inflight: dict[tuple[str, str], int] = {}
        self._last_used: dict[tuple[str, str], float] = {}
        self._usage_due: asyncio.TimerHandle | None = None
        self._usage_sent = 0.0

    # --- the loader's news ----------------------------------------------------------------

    def heard(self, news: dict[str, object]) -> None:
        """The loader's news for a slot (from any thread): keep the newest, wake the waits."""
        slot = news.get("slot")
        if isinstance(slot, str):
            self._news[slot] = dict(news)
        wakers, self._wakers = self._wakers, []
        for loop, fut in wakers:
            if not loop.is_closed() and not fut.done():
                loop.call_soon_threadsafe(_wake, fut)

    def news(self, slot: str) -> dict[str, Any]:
        return self._news.get(slot, {})

    def _next_news(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._wakers.append((loop, fut))
        return fut

    def where(self, slot: str, ticket: str, model: ModelEntry, since: float) -> Waiting:
        """Where a ticket stands, from the newest news."""
        news = self.news(slot)
        queue = [q.get("ticket") for q in news.get("queue") or () if isinstance(q, dict)]
        position = queue.index(ticket) + 1 if ticket in queue else None
        progress = None
        if news.get(states.LOAD_LOADING) == model.upstream_model:
            reason = states.LOAD_LOADING
            value = news.get("progress")
            progress = float(value) if isinstance(value, int | float) else None
        elif news.get("evicting"):
            reason = "evicting"
        else:
            reason = "queued"
        return Waiting(slot, model.model_id, position, reason, progress, time.monotonic() - since)

    # --- waiting for a model --------------------------------------------------------------

    async def wait(
        self,
        slot: SlotEntry,
        model: ModelEntry,
        on_wait: Callable[[Waiting], None] | None = None,
        request_id: str | None = None,
    ) -> SlotEntry:
        """Wait until ``model`` is loaded on ``slot`` (asking the loader for it); the slot as
        it then is. 502 ``model_load_failed`` at once when its load fails, 503
        ``slot_loading`` after ``HAL0_SWAP_WAIT_S``. Its ticket in the queue is its request
        id (the page finds its own request's place by it), else a fresh one."""
        ticket = request_id or secrets.token_hex(8)
        since = time.monotonic()
        wait_s = settings.HAL0_SWAP_WAIT_S
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        demand = {"type": "load", "slot": slot.name, "model": model.model_id, "ticket": ticket}
        resend_at = 0.0
        saw_loading = False
        try:
            while True:
                changed, heard = store.next_change(), self._next_news()
                current = store.table.slots.get(slot.name)
                entry = current.models.get(model.model_id) if current else None
                if current is None or entry is None or not current.enabled:
                    raise ApiError(
                        503,
                        "slot_unavailable",
                        f"Slot '{slot.name}' no longer serves '{model.model_id}'.",
                        headers={"Retry-After": "1"},
                    )
                if entry.load in states.SERVABLE:
                    self.waited.notify(slot.name, model.model_id, time.monotonic() - since)
                    return current
                failure = self.news(slot.name).get("failed") or {}
                if ticket in failure:
                    raise _failed(current, entry, str(failure[ticket]))
                if saw_loading and entry.load == states.FAILED:
                    raise _failed(current, entry, entry.load_error or "the server said so")
                saw_loading = saw_loading or entry.load == states.LOAD_LOADING
                now = loop.time()
                if now >= deadline:
                    reason = self.where(slot.name, ticket, entry, since).reason
                    raise _timed_out(current, entry, wait_s, reason)
                if now >= resend_at:
                    if resend_at == 0.0 and self._usage_due is not None:
                        # What this process just used goes first: the loader picks what
                        # to evict by it (least recently used), the demand right after.
                        self._usage_changed(0.0)
                    events.publish(demand, events.WATCHER_GROUP)
                    resend_at = now + RESEND_S
                if on_wait is not None:
                    on_wait(self.where(slot.name, ticket, entry, since))
                await asyncio.wait(
                    (changed, heard), timeout=min(resend_at, deadline) - now,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                changed.cancel()
                heard.cancel()
        finally:
            events.publish(
                {"type": "unwait", "slot": slot.name, "ticket": ticket}, events.WATCHER_GROUP
            )

    # --- usage: what the loader must not evict --------------------------------------------

    def began(self, slot: str, upstream_model: str) -> None:
        key = (slot, upstream_model)
        count = self._inflight[key] = self._inflight.get(key, 0) + 1
        self._last_used[key] = time.time()
        # A model that turns busy is told within BUSY_EVERY_S: held back longer, the
        # loader would take it for idle meanwhile (an eviction waits that long for the
        # reports: loader.REPORT_GRACE_S).
        self._usage_changed(BUSY_EVERY_S if count == 1 else USAGE_EVERY_S)

    def ended(self, slot: str, upstream_model: str) -> None:
        key = (slot, upstream_model)
        count = self._inflight.get(key, 0) - 1
        if count > 0:
            self._inflight[key] = count
        else:
            self._inflight.pop(key, None)
        self._last_used[key] = time.time()
        self._usage_changed()

    def inflight(self, slot: str, upstream_model: str) -> int:
        return self._inflight.get((slot, upstream_model), 0)

    def usage(self) -> dict[str, dict[str, list[float]]]:
        """This process's report: slot -> upstream model -> [in flight, last used]."""
        report: dict[str, dict[str, list[float]]] = {}
        for (slot, model), used in self._last_used.items():
            report.setdefault(slot, {})[model] = [self._inflight.get((slot, model), 0), used]
        return report

    def _usage_changed(self, within: float = USAGE_EVERY_S) -> None:
        """Have a report sent within ``within`` of the last one (at once when that is past);
        one already due by then carries this change too."""
        loop = asyncio.get_running_loop()
        at = max(loop.time(), self._usage_sent + within)
        due = self._usage_due
        if due is not None:
            if due.when() <= at:
                return  # a report is already due: it will carry this change
            due.cancel()
        if at <= loop.time():
            self._send_usage()
        else:
            self._usage_due = loop.call_at(at, self._send_usage)

    def _send_usage(self) -> None:
        self._usage_due = None
        self._usage_sent = asyncio.get_running_loop().time()
        events.publish(
            {"type": "usage", "worker": WORKER, "slots": self.usage()}, events.WATCHER_GROUP
        )


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


loads = Loads()
