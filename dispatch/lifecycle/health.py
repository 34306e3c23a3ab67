"""The slot watcher: probes every enabled slot and keeps its state and models true.

Each slot has its own probe loop, so a slow slot never delays another, and at most one probe
per slot is in flight. A probe's result is written to the database only when it changes
something; the write goes through the model signals like any other change, so the routing
table, the waiting requests and the live UI all hear of it by one path.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import OperationalError, close_old_connections, transaction
from django.utils import timezone

from dispatch.coordination import events, leases, sync
from dispatch.coordination.store import store
from dispatch.routing import states
from dispatch.routing.table import SlotEntry
from dispatch.upstream.admission import admission
from dispatch.upstream.outliers import outliers
from dispatch.upstream.proxy import server_root, upstream, upstream_url

log = logging.getLogger("hal0.health")


# Pauses between tries of a probe result's write (SQLite busy past its timeout, PostgreSQL
# briefly away). Short: a probe result is worth most while it is fresh.
SAVE_RETRY_PAUSES_S = (0.05, 0.2, 0.5)

# Not a slot state: what a probe saw when the server is up but too busy to list its models.
BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Observation:
    state: str
    error: str
    advertised: tuple[str, ...] | None  # model ids from /models; None when not read
    timed_out: bool = False  # /models gave no answer in time (as opposed to refusing)
    # model id -> the rest of its /models entry (context_length, capabilities, meta...)
    details: Mapping[str, Mapping[str, Any]] | None = None


# Fields of a /models entry that are not kept: hal0web writes its own id and object.
_NOT_KEPT = frozenset({"id", "object"})
# Fields that do not count as a change on their own: llama.cpp's server answers `created`
# with the time of each request, and every probe would otherwise write.
_VOLATILE = frozenset({"created"})


def fields_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether a model's upstream fields changed in a way worth writing."""
    return {k: v for k, v in old.items() if k not in _VOLATILE} != {
        k: v for k, v in new.items() if k not in _VOLATILE
    }


async def observe(slot: SlotEntry, timeout: float) -> Observation:
    """Ask the slot how it is: its kind's health endpoint (if any) and ``/models``."""
    health_url: str | None = None
    if slot.kind == "llamacpp":
        health_url = server_root(slot) + "/health"
    elif slot.kind == "lemonade":
        health_url = upstream_url(slot, "health")
    limit = int(settings.HAL0_MAX_RESPONSE_MB * 2**20)
    probes = [upstream.probe(upstream_url(slot, "models"), timeout, limit, slot.api_key_env)]
    if health_url:
        probes.append(upstream.probe(health_url, timeout, limit, slot.api_key_env))
    results = await asyncio.gather(*probes)
    models = results[0]
    health = results[1] if health_url else None
    # A health endpoint the server does not have (404: llama-cpp-python) says nothing.
    h_status = health.status if health is not None and health.status != 404 else None
    if models.status is None and health is not None and health.status == 404:
        # It answered (so it is up) but /models did not: llama-cpp-python serves /v1/models
        # only between generations (it waits for the model lock), so a long generation would
        # otherwise read as "offline" and turn every other request away. Busy: keep the state.
        return Observation(BUSY, models.error, None)
    state = states.classify(slot.kind, h_status, health.body if health else None, models.status)
    advertised: tuple[str, ...] | None = None
    details: dict[str, Mapping[str, Any]] | None = None
    if models.status == 200 and isinstance(models.body, dict):
        data = models.body.get("data")
        if isinstance(data, list):
            entries = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
            advertised = tuple(str(m["id"]) for m in entries)
            details = {
                str(m["id"]): {k: v for k, v in m.items() if k not in _NOT_KEPT} for m in entries
            }
    error = ""
    if state in states.PROBED_DOWN:
        error = (
            models.error or (health.error if health else "") or f"/models answered {models.status}"
        )
    elif state == states.LOADING:
        error = ""
    return Observation(state, error, advertised, timed_out=models.timed_out, details=details)


def apply(slot_name: str, obs: Observation) -> bool:
    """Persist what a probe saw (sync, one transaction). True when anything changed.

    The state is read and written under a row lock in one transaction, so an operator's
    change (draining, disabling) cannot be overwritten by a probe that looked earlier.
    """
    from dispatch.models import ModelSource, Slot, SlotModel, StateVersion

    # This runs in asgiref's long-lived shared thread, outside any request, so Django's
    # per-request connection housekeeping never reaches it: do it here.
    close_old_connections()
    with transaction.atomic():
        StateVersion.lock()
        slot = Slot.objects.select_for_update().filter(name=slot_name).first()
        if slot is None or not slot.enabled:
            return False
        changed: list[str] = []
        new_state = states.after_probe(slot.state, obs.state)
        if new_state != slot.state:
            slot.state = new_state
            slot.state_changed_at = timezone.now()
            changed += ["state", "state_changed_at"]
        if slot.last_error != obs.error and slot.state != states.DRAINING:
            slot.last_error = obs.error
            changed.append("last_error")
        if obs.state == states.READY and obs.advertised is not None:
            advertised = set(obs.advertised)
            rows = list(slot.models.all())
            known = {m.model_id for m in rows}
            upstreams = {m.upstream_model for m in rows if m.source != "discovered"}
            for m in rows:
                if m.source == "discovered" and m.model_id not in advertised:
                    m.delete()
            has_default = any(
                m.is_default for m in rows if m.source != "discovered" or m.model_id in advertised
            )
            details = obs.details or {}
            for m in rows:
                # What the server says of each model it serves, declared or discovered.
                fields = details.get(m.model_id)
                if (
                    m.source != ModelSource.ALIAS
                    and m.model_id in advertised
                    and fields is not None
                    and fields_changed(m.upstream_fields or {}, fields)
                ):
                    m.upstream_fields = dict(fields)
                    m.save(update_fields=["upstream_fields"])
            for model_id in obs.advertised:
                if model_id not in known:
                    SlotModel.objects.create(
                        slot=slot,
                        model_id=model_id,
                        upstream_model=model_id,
                        source=ModelSource.DISCOVERED,
                        is_default=not has_default,
                        upstream_fields=dict(details.get(model_id) or {}),
                    )
                    has_default = True
            drift = sorted(u for u in upstreams if u not in advertised)
            if drift != list(slot.drift or []):
                slot.drift = drift
                changed.append("drift")
        if changed:
            slot.save(update_fields=changed)
            if "state" in changed:
                log.info(
                    "slot %s is %s%s", slot.name, slot.state, f" ({obs.error})" if obs.error else ""
                )
        return bool(changed)


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

    @property
    def running(self) -> bool:
        return self._supervisor is not None and not self._supervisor.done()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.running and self._loop is loop:
            return
        self._loop = loop
        self._tasks, self._pokes = {}, {}
        # A fresh context: started from inside a request, the task would otherwise inherit
        # that request's asgiref executor, which is gone once the request ends.
        self._supervisor = loop.create_task(
            self._supervise(), name="hal0-watcher", context=contextvars.Context()
        )
        self._housekeeper = loop.create_task(
            run_housekeeping(), name="hal0-housekeeping", context=contextvars.Context()
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
        obs = await observe(slot, timeout)
        probed(slot.name, time.perf_counter() - began, obs.state)
        seen_at = timezone.now()
        if obs.state == states.READY:
            outliers.probe_passed(slot.name)  # may end an ejection whose back-off is over
        if obs.state == BUSY:
            self._probed_at[slot.name] = seen_at  # it answered: its state stands
            return False
        if obs.timed_out and admission.inflight.get(slot.name, 0):
            # Requests to it are under way (the proxy hears from it): a probe that timed out
            # means a loaded server or a lagging loop, not a dead one. A refused connection
            # still counts, and so does a timeout once nothing is in flight.
            self._probed_at[slot.name] = seen_at
            return False
        current = store.table.slots.get(slot.name)
        if current is not None and _unchanged(current, obs):
            self._probed_at[slot.name] = seen_at
            return False  # the steady state writes nothing
        saved = await self._save(slot.name, obs)
        if saved is not None:
            self._probed_at[slot.name] = seen_at
        return bool(saved)

    async def _save(self, name: str, obs: Observation) -> bool | None:
        """Write a probe result, trying again while the database is briefly unavailable.

        If every try fails the result is dropped with a warning (None), not lost: the table
        still holds the old state, so the next probe differs from it and writes again.
        """
        pauses = iter(SAVE_RETRY_PAUSES_S)
        while True:
            try:
                return await sync_to_async(apply, thread_sensitive=True)(name, obs)
            except OperationalError as exc:
                pause = next(pauses, None)
                if pause is None:
                    log.warning(
                        "could not save the probe of slot %s (%s); the next probe saves it",
                        name,
                        exc,
                    )
                    return None
            await asyncio.sleep(pause)

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


def _unchanged(slot: SlotEntry, obs: Observation) -> bool:
    if states.after_probe(slot.state, obs.state) != slot.state:
        return False
    if slot.state != states.DRAINING and slot.last_error != obs.error:
        return False
    if obs.state != states.READY or obs.advertised is None:
        return True
    advertised = set(obs.advertised)
    discovered = {m for m, e in slot.models.items() if e.source == "discovered"}
    declared_upstream = {e.upstream_model for e in slot.models.values() if e.source != "discovered"}
    if discovered - advertised:
        return False
    if advertised - set(slot.models):
        return False
    details = obs.details or {}
    for model_id, entry in slot.models.items():
        fields = details.get(model_id)
        if (
            entry.source != "alias"
            and fields is not None
            and fields_changed(entry.upstream_fields, fields)
        ):
            return False
    return tuple(sorted(u for u in declared_upstream if u not in advertised)) == tuple(slot.drift)


watcher = Watcher()


class Leadership:
    """Stand for the watcher lease; while holding it, run the watcher and beat its heart.

    Every process that may watch runs one of these; the lease (``dispatch.coordination.leases``) lets one
    lead. The others ask again every tick, so when the leader dies another leads within a
    probe interval or two. The leader writes when the state of every slot was last known
    (``StateVersion.beat``), which is how every process tells fresh state from stale.
    """

    def __init__(self) -> None:
        self.leading = False
        self._lease: leases.Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._beaten: datetime | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.running and self._task is not None and self._task.get_loop() is loop:
            return
        self.leading, self._beaten = False, None
        self._task = loop.create_task(
            self._run(), name="hal0-leadership", context=contextvars.Context()
        )

    async def stop(self) -> None:
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._listener = None
        if self.leading:
            self.leading = False
            await watcher.stop()
        if self._lease is not None:
            await sync_to_async(self._lease.release, thread_sensitive=True)()

    async def _run(self) -> None:
        if self._lease is None:
            self._lease = leases.watcher_lease()
        lease = self._lease
        while True:
            try:
                if not self.leading:
                    if await sync_to_async(lease.try_acquire, thread_sensitive=True)():
                        self.leading = True
                        log.info("this process (%s) leads the watcher", leases.IDENTITY)
                        watcher.start()
                        self._listener = asyncio.get_running_loop().create_task(
                            events.listen(events.WATCHER_GROUP, self._heard)
                        )
                elif not await sync_to_async(lease.held, thread_sensitive=True)():
                    log.warning("this process lost the watcher lease; standing by")
                    self.leading = False
                    if self._listener is not None:
                        self._listener.cancel()
                    await watcher.stop()
                if self.leading:
                    await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception:  # the database may be briefly away; the next tick tries again
                log.warning("watcher leadership check failed", exc_info=True)
            await asyncio.sleep(min(settings.HAL0_PROBE_INTERVAL_S, 1.0))

    async def _beat(self) -> None:
        from dispatch.models import StateVersion

        probed_at = watcher.last_round()
        if probed_at is not None and probed_at != self._beaten:
            await sync_to_async(StateVersion.beat, thread_sensitive=True)(
                probed_at, leases.IDENTITY
            )
            self._beaten = probed_at

    def _heard(self, event: dict[str, Any]) -> None:
        if event.get("type") == "poke" and isinstance(event.get("slot"), str):
            watcher.poke(event["slot"])


leadership = Leadership()


def ensure_running() -> None:
    """Stand for the watcher lease on this loop (unless HAL0_WATCHER=false), and in every
    process follow the state version, so changes other processes commit arrive here."""
    if settings.HAL0_WATCHER:
        leadership.start()
    sync.ensure_following()


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


# --- hooks: what other modules hang on the watcher (metrics, the request log) ---------------
# Kept apart so the watcher itself stays about slots. Only the process that runs the watcher
# (the server with HAL0_WATCHER=true, or `manage.py watch`) runs them, so with several workers
# the housekeeping happens once, not once per worker.

# Called after every probe with (slot, seconds, observed state).
probe_listeners: list[Callable[[str, float, str], None]] = []
# Sync jobs run in a thread when the watcher starts and every HOUSEKEEPING_S after.
housekeeping: list[Callable[[], object]] = []
HOUSEKEEPING_S = 3600.0


def probed(slot: str, seconds: float, state: str) -> None:
    for listener in probe_listeners:
        try:
            listener(slot, seconds, state)
        except Exception:  # a listener's bug must not stop the probe loop
            log.exception("probe listener failed")


async def run_housekeeping() -> None:
    while True:
        for job in housekeeping:
            try:
                await sync_to_async(job, thread_sensitive=True)()
            except Exception:  # the database may be briefly away; the next round tries again
                log.warning("housekeeping job %s failed", job, exc_info=True)
        await asyncio.sleep(HOUSEKEEPING_S)
