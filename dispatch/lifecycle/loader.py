"""The loader: one process decides every slot's model loads and evictions.

It runs beside the watcher, in the process that holds the watcher lease
(``dispatch.lifecycle.leadership``), one queue per slot whose server loads models when asked
(``SlotEntry.loads_models``). Requests in every process ask it for a model over the channel
layer and wait (``dispatch.upstream.loads``); operators ask through the database
(``dispatch.lifecycle.control``). For each slot, in order of arrival:

- a model already loaded needs nothing: its waiters go (they read the table);
- requests for the model being loaded join that load;
- one load at a time: a slot at its limit (``model_limit``) first unloads the least recently
  used idle, unpinned model itself (``dispatch.routing.eviction``), so the server's own
  eviction never hits a busy model; a busy one is given ``HAL0_SWAP_HOLD_S`` to finish its
  requests before it is swapped out (fewer swaps, nothing starves), marked ``unloading`` so
  no new request lands on it meanwhile;
- a failed load fails its waiters at once with the server's reason, and every model's state
  is read again from the server;
- a model idle for the slot's ``unload_idle_s`` is unloaded through the same path.

What lasts (a model's load state) is written to the database, so every process's table says
it; what is fleeting (the queue, the progress, a failure by ticket) is its news, heard by
every process (``dispatch.coordination.sync.loads_news``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from django.conf import settings

from dispatch import kinds
from dispatch.coordination import events
from dispatch.coordination.store import store
from dispatch.coordination.usage import UsageReports
from dispatch.kinds import ModelLoad
from dispatch.lib.listeners import Listeners
from dispatch.lifecycle import persistence
from dispatch.lifecycle.control import LOAD, UNLOAD
from dispatch.lifecycle.pushes import pushes
from dispatch.routing import eviction, states
from dispatch.routing.table import SlotEntry
from dispatch.upstream.client import upstream
from dispatch.upstream.loads import BUSY_EVERY_S, RESEND_S

log = logging.getLogger("hal0.loads")

# A request's demand not heard again for this long is gone (it re-sends every RESEND_S).
DEMAND_TTL_S = 3 * RESEND_S + 1.0
# Every process reports a model turning busy within BUSY_EVERY_S: an eviction waits this
# long (and the message's way), once the model takes no new request, before it trusts them.
REPORT_GRACE_S = BUSY_EVERY_S + 0.1
# How long the requests in flight on a model being evicted may take to finish.
DRAIN_MAX_S = 600.0
# How often a server that unloads on its own is asked whether the model is gone.
GONE_POLL_S = 0.05
# A model just loaded for waiting requests counts as busy this long: their first usage
# report (sent as a model turns busy) may not have reached the loader yet, and the next
# demand in the queue must not swap it out from under them.
FRESH_S = 2.0
# How often a slot's queue looks again when nothing woke it (idle unloads, stale demands).
TICK_S = 1.0
# How often the server is asked how a load it runs on its own is going, when it pushes
# nothing; when it pushes, a probe only this often (a missed event costs no more).
LOAD_POLL_S = 0.5
PUSHED_CHECK_S = 5.0
_ANSWER_LIMIT = 1 << 20

# Told (slot, upstream model, seconds, ok) when a load ends, and (slot, upstream model) when
# an unload does: the metrics count them.
loaded: Listeners[[str, str, float, bool]] = Listeners("the loads")
unloaded: Listeners[[str, str]] = Listeners("the unloads")


@dataclass
class Demand:
    ticket: str
    model: str  # the id the request asked for
    upstream: str  # the id the server knows it by
    since: float  # monotonic, when the loader first heard it
    heard: float  # monotonic, when it last heard it


class SlotLoader:
    """One slot's queue and the one task that works it."""

    def __init__(self, owner: Loader, name: str) -> None:
        self.owner, self.name = owner, name
        self.queue: dict[str, Demand] = {}
        self.wake = asyncio.Event()
        self.loading: str | None = None
        self.evicting: str | None = None
        self.failed: dict[str, str] = {}  # ticket -> reason, told once in the news
        self.fresh: dict[str, float] = {}  # model -> monotonic time loaded for waiters
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name=f"hal0-loader-{name}", context=contextvars.Context()
        )

    # --- what it hears ----------------------------------------------------------------------

    def demand(self, ticket: str, model_id: str) -> None:
        now = time.monotonic()
        known = self.queue.get(ticket)
        if known is not None:
            known.heard = now
            return
        slot = store.table.slots.get(self.name)
        entry = slot.models.get(model_id) if slot else None
        if entry is None:
            return  # the request reads the table and gives up by itself
        self.queue[ticket] = Demand(ticket, model_id, entry.upstream_model, now, now)
        self.tell()
        self.wake.set()

    def unwait(self, ticket: str) -> None:
        if self.queue.pop(ticket, None) is not None:
            self.tell()
            self.wake.set()

    # --- the work ---------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), TICK_S)
            except TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug or a database blip must not end the slot's queue
                log.exception("the loader of slot %s failed a step", self.name)
                await asyncio.sleep(TICK_S)

    def _slot(self) -> SlotEntry | None:
        slot = store.table.slots.get(self.name)
        if slot is None or not slot.enabled or not slot.loads_models:
            return None
        # When each model was last used, as the processes' reports say (newer than the
        # table's, which the loader writes only now and then).
        used = self.owner.usage.last_used(self.name)
        models = {
            k: replace(m, last_used=max(m.last_used, used.get(m.upstream_model, 0.0)))
            for k, m in slot.models.items()
        }
        return replace(slot, models=MappingProxyType(models))

    async def step(self) -> None:
        slot = self._slot()
        if slot is None:
            if self.queue:
                self.queue.clear()
                self.tell()
            return
        self._prune()
        await self._operator(slot)
        slot = self._slot() or slot
        served = eviction.served(slot)
        done = [t for t, d in self.queue.items() if _servable(served.get(d.upstream))]
        for ticket in done:
            self.queue.pop(ticket)
        if done:
            self.tell()
        if not self.queue:
            await self._unload_idle(slot)
            return
        head = next(iter(self.queue.values()))
        if not await self._room(slot, head):
            return
        await self.load(self._slot() or slot, head.upstream)

    def _prune(self) -> None:
        now = time.monotonic()
        stale = [
            t
            for t, d in self.queue.items()
            if not t.startswith("op:") and now - d.heard > DEMAND_TTL_S
        ]
        for ticket in stale:
            self.queue.pop(ticket)
        if stale:
            self.tell()

    async def _operator(self, slot: SlotEntry) -> None:
        """Act on what an operator asked through the database."""
        for upstream_id, m in eviction.served(slot).items():
            wanted = self.owner.wanted.get((self.name, upstream_id))
            if wanted == LOAD:
                ticket = f"op:{upstream_id}"
                if _servable(m):
                    await persistence.save_loads(self.name, {}, done=[upstream_id])
                elif ticket not in self.queue:
                    now = time.monotonic()
                    self.queue[ticket] = Demand(ticket, m.model_id, upstream_id, now, now)
                    self.tell()
            elif wanted == UNLOAD:
                if m.load in states.RESIDENT:
                    await self.evict(slot, upstream_id)
                await persistence.save_loads(self.name, {}, done=[upstream_id])

    async def _room(self, slot: SlotEntry, head: Demand) -> bool:
        """Make room for the head's model; False to look again later (or after failing its
        waiters: no model can make room)."""
        if not eviction.needs_room(slot, head.upstream):
            return True
        busy = self.busy()
        victim = eviction.victim(slot, head.upstream, busy)
        if victim is None:
            if any(m.load == states.UNLOADING for m in eviction.served(slot).values()):
                return False  # one is on its way out already
            self._fail(head.upstream, "no room: every model it keeps loaded is pinned")
            return False
        waited = time.monotonic() - head.since
        if busy.get(victim) and waited < settings.HAL0_SWAP_HOLD_S:
            # New requests keep coming to it for a while (fewer swaps); usage reports wake
            # the queue when it turns idle. Past the hold it takes none, and those in
            # flight finish before it goes (evict).
            return False
        return await self.evict(slot, victim)

    async def evict(self, slot: SlotEntry, victim: str) -> bool:
        """Unload ``victim``: no new request lands on it (``unloading``), those in flight
        finish (for at most ``DRAIN_MAX_S``), then the server is asked, and the loader waits
        until the server says the model is out of memory (a server that only starts the
        unload would refuse the next load: llama.cpp's "model limit reached")."""
        kind = kinds.get(slot.kind)
        call = kind.unload_call(slot, victim)
        if call is None:
            return False
        self.evicting = victim
        self._hold(victim)
        try:
            await persistence.save_loads(self.name, {victim: ModelLoad(states.UNLOADING)})
            self.tell()
            # A request that began just now may not be in any report yet: wait for the
            # next ones before taking the model for idle.
            await asyncio.sleep(REPORT_GRACE_S)
            deadline = time.monotonic() + DRAIN_MAX_S
            while self.busy().get(victim) and time.monotonic() < deadline:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), LOAD_POLL_S)
                except TimeoutError:
                    pass
            answer = await upstream.ask(
                call.method, call.url, call.body, call.timeout_s, _ANSWER_LIMIT, slot.api_key_env
            )
            reason = kind.call_failed(answer.status, answer.body or answer.error)
            if reason is None and not kind.unload_call_waits:
                reason = await _until_gone(slot, victim, call.timeout_s)
            if reason is None:
                await persistence.save_loads(self.name, {victim: ModelLoad(states.UNLOADED)})
                unloaded.notify(self.name, victim)
                log.info("slot %s: unloaded %s", self.name, victim)
                return True
            log.warning("slot %s: unloading %s failed: %s", self.name, victim, reason)
            return False
        finally:
            self.evicting = None
            self._unhold(victim)
            await self._reread(slot)
            self.tell()

    async def load(self, slot: SlotEntry, model: str) -> None:
        """Load ``model`` and tell its waiters how it went."""
        kind = kinds.get(slot.kind)
        call = kind.load_call(slot, model)
        if call is None:
            self._fail(model, "its server cannot be asked to load a model")
            return
        began = time.monotonic()
        self.loading = model
        self._hold(model)
        try:
            await persistence.save_loads(self.name, {model: ModelLoad(states.LOAD_LOADING)})
            self.tell()
            log.info("slot %s: loading %s", self.name, model)
            answer = await upstream.ask(
                call.method, call.url, call.body, call.timeout_s, _ANSWER_LIMIT, slot.api_key_env
            )
            reason = kind.call_failed(answer.status, answer.body or answer.error)
            if reason is None and not kind.load_call_waits:
                # The server loads on its own now: hand the model's state back to the probe.
                self._unhold(model)
                reason = await self._until_loaded(slot, model, call.timeout_s)
            seconds = time.monotonic() - began
            loaded.notify(self.name, model, seconds, reason is None)
            if reason is None:
                if any(d.upstream == model for d in self.queue.values()):
                    self.fresh[model] = time.monotonic()
                now = time.time()
                await persistence.save_loads(
                    self.name, {model: ModelLoad(states.LOADED)}, used={model: now}, done=[model]
                )
                log.info("slot %s: loaded %s in %.1fs", self.name, model, seconds)
            else:
                log.warning("slot %s: loading %s failed: %s", self.name, model, reason)
                await persistence.save_loads(
                    self.name, {model: ModelLoad(states.FAILED, error=reason)}, done=[model]
                )
                self._fail(model, reason)
        finally:
            self.loading = None
            self._unhold(model)
            self.tell()
        if reason is not None:
            await self._reread(slot)  # a failed load may have unloaded others (Lemonade)

    async def _until_loaded(self, slot: SlotEntry, model: str, timeout: float) -> str | None:
        """Wait for a load the server runs on its own: its pushed events (``pushes``) or, for
        a server that pushes nothing, the probes asked here say when it is done. The
        failure's reason, or None once loaded."""
        from dispatch.lifecycle.watcher import watcher

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            changed = store.next_change()
            entry = eviction.served(store.table.slots.get(self.name) or slot).get(model)
            if entry is not None and entry.load in states.SERVABLE:
                changed.cancel()
                return None
            if entry is not None and entry.load == states.FAILED:
                changed.cancel()
                return entry.load_error or "the server said the load failed"
            self.tell()  # its progress, as the last event or probe said it
            pushed = pushes.following(self.name)
            try:
                await asyncio.wait_for(changed, PUSHED_CHECK_S if pushed else LOAD_POLL_S)
            except TimeoutError:
                current = store.table.slots.get(self.name)
                if current is not None:
                    await watcher.probe_once(current)
        return f"not loaded after {timeout:g}s"

    async def _unload_idle(self, slot: SlotEntry) -> None:
        if not slot.unload_idle_s:
            return
        busy = self.busy()
        now = time.time()
        for m in eviction.resident(slot):
            if m.load != states.LOADED or m.pinned or busy.get(m.upstream_model):
                continue
            if m.last_used and now - m.last_used > slot.unload_idle_s:
                log.info(
                    "slot %s: %s idle for %.0fs", self.name, m.upstream_model, slot.unload_idle_s
                )
                await self.evict(slot, m.upstream_model)

    async def _reread(self, slot: SlotEntry) -> None:
        from dispatch.lifecycle.watcher import watcher

        current = store.table.slots.get(self.name)
        if current is not None:
            await watcher.probe_once(current)

    def busy(self) -> dict[str, int]:
        """Requests in flight per model, as the processes report them, and models just
        loaded for waiters whose reports may still be on their way."""
        busy = self.owner.usage.busy(self.name)
        now = time.monotonic()
        for model, at in list(self.fresh.items()):
            if now - at > FRESH_S:
                del self.fresh[model]
            else:
                busy[model] = busy.get(model, 0) + 1
        return busy

    def _fail(self, model: str, reason: str) -> None:
        for ticket in [t for t, d in self.queue.items() if d.upstream == model]:
            self.queue.pop(ticket)
            if not ticket.startswith("op:"):
                self.failed[ticket] = reason
        self.tell()

    def _hold(self, model: str) -> None:
        persistence.held[self.name] = persistence.held.get(self.name, frozenset()) | {model}

    def _unhold(self, model: str) -> None:
        left = persistence.held.get(self.name, frozenset()) - {model}
        if left:
            persistence.held[self.name] = left
        else:
            persistence.held.pop(self.name, None)

    def tell(self) -> None:
        """The news, to every process (and its pages)."""
        slot = store.table.slots.get(self.name)
        progress = None
        if slot is not None and self.loading is not None:
            entry = eviction.served(slot).get(self.loading)
            progress = entry.progress if entry is not None else None
        news: dict[str, Any] = {
            "type": "loads",
            "slot": self.name,
            states.LOAD_LOADING: self.loading,  # the key names the model by its load state
            "progress": progress,
            "evicting": self.evicting,
            "queue": [
                {"ticket": d.ticket, "model": d.model, "since": d.since}
                for d in self.queue.values()
            ],
            "failed": self.failed,
            "at": time.time(),
        }
        self.failed = {}
        events.publish(news, events.SYNC_GROUP)


async def _until_gone(slot: SlotEntry, model: str, timeout: float) -> str | None:
    """Wait until the server no longer holds ``model`` in memory (asked directly: the probe
    would not write the state of a model the loader holds). None once gone."""
    from dispatch.lifecycle.probe import observe

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obs = await observe(slot, 2.0)
        said = obs.loads.models.get(model) if obs.loads is not None else None
        if obs.loads is not None and (said is None or said.state not in states.RESIDENT):
            return None
        await asyncio.sleep(GONE_POLL_S)
    return f"still in memory {timeout:g}s after the unload was asked"


def _servable(entry: Any) -> bool:
    return entry is not None and entry.load in states.SERVABLE


class Loader:
    """Every slot's queue, the processes' usage reports, the operators' wishes."""

    def __init__(self) -> None:
        self.slots: dict[str, SlotLoader] = {}
        self.usage = UsageReports()
        self.wanted: dict[tuple[str, str], str] = {}

    _listening = False
    _subscribed = False

    def start(self) -> None:
        self._listening = True
        if not Loader._subscribed:
            Loader._subscribed = True
            store.on_change(self._table_changed)

    async def stop(self) -> None:
        self._listening = False
        await pushes.stop()
        tasks = [s.task for s in self.slots.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.slots.clear()
        self.usage.clear()
        persistence.held.clear()

    def forget(self) -> None:
        """Drop every queue and report without stopping their tasks (a test's loop is gone)."""
        self._listening = False
        self.slots.clear()
        self.usage.clear()
        self.wanted.clear()
        pushes.tasks.clear()

    def heard(self, event: dict[str, Any]) -> None:
        """A message for the loader (the leader's ear, ``events.WATCHER_GROUP``)."""
        kind, slot = event.get("type"), event.get("slot")
        if kind == "usage" and isinstance(event.get("worker"), str):
            self.usage.heard(event["worker"], event.get("slots") or {})
            for loader in self.slots.values():
                loader.wake.set()
        elif kind == "load" and isinstance(slot, str):
            ticket, model = event.get("ticket"), event.get("model")
            if isinstance(ticket, str) and isinstance(model, str):
                self.of(slot).demand(ticket, model)
        elif kind == "unwait" and isinstance(slot, str) and slot in self.slots:
            ticket = event.get("ticket")
            if isinstance(ticket, str):
                self.slots[slot].unwait(ticket)

    def of(self, slot: str) -> SlotLoader:
        loader = self.slots.get(slot)
        if loader is None or loader.task.done():
            loader = self.slots[slot] = SlotLoader(self, slot)
        return loader

    def _table_changed(self, _old: Any, new: Any) -> None:
        """From the thread that reloaded: operators' wishes, and slots that load models
        (each gets its queue, for idle unloads even when no request waits)."""
        if not self._listening:
            return
        wanted = self._wishes(new)
        names = [s.name for s in new.slots.values() if s.enabled and s.loads_models]
        loop = _home
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._apply, wanted, names)

    @staticmethod
    def _wishes(table: Any) -> dict[tuple[str, str], str]:
        from dispatch.models import SlotModel

        rows = SlotModel.objects.exclude(wanted="").values_list(
            "slot__name", "upstream_model", "wanted"
        )
        names = {s.name for s in table.slots.values()}
        return {(s, u): w for s, u, w in rows if s in names}

    def _apply(self, wanted: dict[tuple[str, str], str], names: list[str]) -> None:
        if not self._listening:
            return
        self.wanted = wanted
        for name in names:
            self.of(name).wake.set()
        pushes.follow(names)


_home: asyncio.AbstractEventLoop | None = None
loader = Loader()


def start() -> None:
    """Lead the loads (the watcher's process calls it when it starts leading)."""
    global _home
    _home = asyncio.get_running_loop()
    loader.start()
    table = store.table
    loader._apply({}, [s.name for s in table.slots.values() if s.enabled and s.loads_models])


async def stop() -> None:
    await loader.stop()
