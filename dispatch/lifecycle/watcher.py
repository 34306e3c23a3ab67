"""The slot watcher: probes every enabled slot and keeps its state and models true.

Each slot has its own probe loop, so a slow slot never delays another, and at most one probe
per slot is in flight. A probe's result is written to the database only when it changes
something (``dispatch.lifecycle.changes``); the write (``dispatch.lifecycle.persistence``)
goes through the model signals like any other change, so the routing table, the waiting
requests and the live UI all hear of it by one path. Only the process that leads
(``dispatch.lifecycle.leadership``) runs it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import replace
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

from dispatch.coordination import events
from dispatch.coordination.store import store
from dispatch.lifecycle import discovery, hooks, persistence
from dispatch.lifecycle.changes import changes
from dispatch.lifecycle.probe import BUSY, Observation, observe
from dispatch.routing import speaks, states
from dispatch.routing.table import SlotEntry
from dispatch.upstream.admission import admission

log = logging.getLogger("hal0.health")


class Watcher:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pokes: dict[str, asyncio.Event] = {}
        self._supervisor: asyncio.Task[None] | None = None
        self._cold: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probes: dict[str, asyncio.Task[bool]] = {}  # the one probe in flight per slot
        self._probed_at: dict[str, datetime] = {}  # when each slot's state was last known
        self._housekeeper: asyncio.Task[None] | None = None  # see run_housekeeping
        self._asked = discovery.Asked()  # what each ready slot was asked it speaks

    @property
    def running(self) -> bool:
        return self._supervisor is not None and not self._supervisor.done()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.running and self._loop is loop:
            return
        self._loop = loop
        self._tasks, self._pokes = {}, {}
        self._asked = discovery.Asked()  # a watcher that starts asks every ready slot once
        # A fresh context: started from inside a request, the task would otherwise inherit
        # that request's asgiref executor, which is gone once the request ends.
        self._supervisor = loop.create_task(
            self._supervise(), name="hal0-watcher", context=contextvars.Context()
        )
        self._housekeeper = loop.create_task(
            hooks.run_housekeeping(), name="hal0-housekeeping", context=contextvars.Context()
        )

    async def stop(self) -> None:
        tasks: list[asyncio.Task[Any]] = [*self._tasks.values(), *self._probes.values()]
        if self._supervisor is not None:
            tasks.append(self._supervisor)
        if self._housekeeper is not None:
            tasks.append(self._housekeeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await persistence.idle()  # stopped means nothing it probed is still being written
        self._tasks.clear()
        self._probes.clear()
        self._supervisor = None

    def poke(self, slot: str) -> None:
        """Probe ``slot`` now (passive health: a request just failed to reach it)."""
        event = self._pokes.get(slot)
        if event is not None:
            event.set()

    async def _supervise(self) -> None:
        await store.ensure_loaded()
        while True:
            changed = store.next_change()
            table = store.table
            wanted = {s.name for s in table.slots.values() if s.enabled}
            for name in list(self._tasks):
                if name not in wanted:
                    self._tasks.pop(name).cancel()
                    self._pokes.pop(name, None)
            for name in wanted - self._tasks.keys():
                self._pokes[name] = asyncio.Event()
                self._tasks[name] = asyncio.create_task(self._run(name), name=f"hal0-probe-{name}")
            await changed

    async def _run(self, name: str) -> None:
        backoff = 1.0
        while True:
            slot = store.table.slots.get(name)
            if slot is None:
                return
            try:
                await self.probe_once(slot)
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe bug must not end the loop: log it and keep probing
                log.exception("probe of slot %s failed", name)
            slot = store.table.slots.get(name)
            interval = settings.HAL0_PROBE_INTERVAL_S
            if slot is not None and slot.state in states.NOT_UP_YET:
                wait, backoff = min(backoff, interval), min(backoff * 2, interval)
            else:
                wait, backoff = interval, 1.0
            event = self._pokes.get(name)
            if event is None:
                return
            try:
                await asyncio.wait_for(event.wait(), wait)
            except TimeoutError:
                pass
            event.clear()

    async def probe_once(self, slot: SlotEntry) -> bool:
        """Probe ``slot`` and apply what changed; joins the probe already in flight, if any.

        The slot's own loop, a cold-start probe and a passive-health poke may all ask at
        once: the slot still sees one probe at a time.
        """
        task = self._probes.get(slot.name)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._probe(slot), context=contextvars.Context()
            )
            self._probes[slot.name] = task
        # Shielded: a caller that stops waiting (a cold probe out of time) leaves it running.
        return await asyncio.shield(task)

    async def _probe(self, slot: SlotEntry) -> bool:
        timeout = max(0.5, min(slot.connect_timeout_s, settings.HAL0_PROBE_INTERVAL_S, 5.0))
        began = time.perf_counter()
        flowing = admission.inflight.get(slot.name, 0)
        obs = await observe(slot, timeout)
        hooks.probed(slot.name, time.perf_counter() - began, obs.state)
        obs = await self._asking(slot, obs, timeout)
        seen_at = timezone.now()
        if obs.state == BUSY:
            self._probed_at[slot.name] = seen_at  # it answered: its state stands
            return False
        if obs.timed_out and (flowing or admission.inflight.get(slot.name, 0)):
            # Requests to it were under way when the probe began or are now (the proxy hears
            # from it): a probe that timed out means a loaded server or a lagging loop, not a
            # dead one. (Only "now" lost the race with a stream that ended while its probe
            # waited.) A refused connection still counts, and so does a timeout begun and
            # ended with nothing in flight.
            self._probed_at[slot.name] = seen_at
            return False
        current = store.table.slots.get(slot.name)
        held = persistence.held.get(slot.name, frozenset())
        # The wall clock: a passing probe may end an ejection whose back-off is over, which
        # any process may have begun (dispatch.coordination.ejections).
        if current is not None and not changes(current, obs, held, time.time()):
            self._probed_at[slot.name] = seen_at
            return False  # the steady state writes nothing
        saved = await persistence.save(slot.name, obs)
        if saved is not None:
            self._probed_at[slot.name] = seen_at
        elif obs.spoken is not None:
            self._asked.forget(slot.name)  # not written: ask again at the next probe
        return bool(saved)

    async def _asking(self, slot: SlotEntry, obs: Observation, timeout: float) -> Observation:
        """The observation, with what the server speaks when it is to be asked: once each
        time it is found ready (``dispatch.lifecycle.discovery``)."""
        if obs.state == states.READY:
            if not self._asked.wanted(slot):
                return obs
            found = await discovery.discover(slot, timeout, obs.loads)
            self._asked.done(slot)
            return replace(obs, spoken=found, spoken_for=speaks.key(slot.kind, slot.type, slot.url))
        if obs.state != BUSY:
            self._asked.forget(slot.name)  # down or loading: asked again once it is back
        return obs

    def last_round(self) -> datetime | None:
        """Since when the state of every enabled slot is known: the oldest of their last
        probes (now, with no slot to probe); None until each has been probed once."""
        names = [s.name for s in store.table.slots.values() if s.enabled]
        if not names:
            return timezone.now()
        times = [self._probed_at.get(name) for name in names]
        return None if any(t is None for t in times) else min(t for t in times if t is not None)

    async def cold_probe(self) -> None:
        """Probe every never-probed slot once, shared by all callers, bounded in time."""
        if self._cold is None or self._cold.done():
            self._cold = asyncio.get_running_loop().create_task(
                self._probe_unknown(), context=contextvars.Context()
            )
        try:
            await asyncio.wait_for(asyncio.shield(self._cold), settings.HAL0_COLD_PROBE_S)
        except TimeoutError:
            pass

    async def _probe_unknown(self) -> None:
        table = store.table
        slots = [table.slots[n] for n in table.unprobed]
        await asyncio.gather(*(self.probe_once(s) for s in slots), return_exceptions=True)


watcher = Watcher()


def suspect(slot: str, reason: str) -> None:
    """A request just failed to reach ``slot``: have the watcher probe it now, wherever the
    watcher runs (here, or in the leading process through the channel layer)."""
    log.info("slot %s suspect: %s", slot, reason)
    if watcher.running:
        watcher.poke(slot)
    else:
        events.publish({"type": "poke", "slot": slot}, events.WATCHER_GROUP)


async def cold_probe() -> None:
    await watcher.cold_probe()
