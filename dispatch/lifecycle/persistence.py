"""Probe results, written: each slot's row and its models, under the row lock.

Results that come while a write is under way are written together, in one transaction of a
few statements. Its commit reloads the table like any other change (``dispatch.signals``),
so the routing table, the waiting requests and the live UI all hear of it by one path, and
every other process follows the version once for the whole batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async
from django.db import OperationalError, close_old_connections, transaction
from django.utils import timezone

from dispatch.coordination import sync
from dispatch.coordination.store import ejection_of
from dispatch.kinds import ModelLoad
from dispatch.lifecycle.changes import CLEARED, Changes, changes, reads_models
from dispatch.lifecycle.probe import Observation
from dispatch.routing import speaks, states
from dispatch.routing.table import ModelEntry, SlotEntry

if TYPE_CHECKING:
    from dispatch.models import Slot, SlotModel

log = logging.getLogger("hal0.health")

# Models the loader (dispatch.lifecycle.loader) is loading or evicting, by slot: a probe
# leaves their load state alone until the loader is done with them. The loader runs in the
# process that runs the watcher, so both read this one dict.
held: dict[str, frozenset[str]] = {}

# Pauses between tries of a probe result's write (SQLite busy past its timeout, PostgreSQL
# briefly away). Short: a probe result is worth most while it is fresh.
SAVE_RETRY_PAUSES_S = (0.05, 0.2, 0.5)


def apply(slot_name: str, obs: Observation) -> bool:
    """Persist what a probe saw (sync, one transaction). True when the slot's row changed
    (its state, last error or drift; its models may change without it)."""
    (result,) = apply_all([(slot_name, obs)])
    if isinstance(result, BaseException):
        raise result
    return result


def apply_all(results: Sequence[tuple[str, Observation]]) -> list[bool | Exception]:
    """Persist several probe results in one transaction (sync): for each, True when its
    slot's row changed, False when not, or the error that kept it from being written.

    Each slot's state is read and written under its row lock, so an operator's change
    (draining, disabling) cannot be overwritten by a probe that looked earlier. One commit,
    and a few statements for the whole batch, so one reload of the table in every process
    however many slots changed: a first round over 200 slots was 200 transactions, 4,000
    inserts and 200 full reloads in each process (issue 24).

    A write that fails (a constraint met under a concurrent edit, a bug) takes the batch's
    transaction with it: each result is then written alone, so it costs its own slot only.
    An ``OperationalError`` (the database away, SQLite busy) is raised instead: the caller
    tries the whole batch again.
    """
    # This runs in asgiref's long-lived shared thread, outside any request, so Django's
    # per-request connection housekeeping never reaches it: do it here.
    close_old_connections()
    try:
        with transaction.atomic():
            return list(_write(results))
    except OperationalError:
        raise
    except Exception as exc:
        if len(results) == 1:
            return [exc]
    out: list[bool | Exception] = []
    for result in results:
        try:
            with transaction.atomic():
                out.extend(_write([result]))
        except OperationalError:
            raise
        except Exception as exc:  # this result only: the others are written
            out.append(exc)
    return out


def _write(results: Sequence[tuple[str, Observation]]) -> list[bool]:
    """Inside a transaction: lock the slots' rows, decide what each result changes against
    them (``dispatch.lifecycle.changes``, as the watcher did against the table), write it."""
    from dispatch.models import Slot, SlotModel, StateVersion

    StateVersion.lock()
    names = [name for name, _ in results]
    slots = {s.name: s for s in Slot.objects.select_for_update().filter(name__in=names)}
    reading = [s.pk for name, obs in results if (s := slots.get(name)) and reads_models(obs)]
    rows: dict[int, list[SlotModel]] = {}
    # In the order a slot's models come in (SlotModel.Meta.ordering), slot by slot.
    models = SlotModel.objects.filter(slot_id__in=reading)
    for m in models.order_by("slot_id", "-is_default", "model_id"):
        rows.setdefault(m.slot_id, []).append(m)
    writes = _Writes()
    out: list[bool] = []
    for name, obs in results:
        slot = slots.get(name)
        if slot is None or not slot.enabled:
            out.append(False)
            continue
        mine = rows.get(slot.pk, [])
        change = changes(_as_entry(slot, mine), obs, held.get(name, frozenset()), time.time())
        writes.models(slot, mine, change, obs)
        out.append(writes.slot(slot, change, obs))
    writes.flush()
    return out


def _as_entry(slot: Slot, rows: Iterable[SlotModel]) -> SlotEntry:
    """The locked row as ``changes`` reads a table entry (only what it reads)."""
    models = {
        m.model_id: ModelEntry(
            m.model_id,
            m.upstream_model,
            m.source,
            m.is_default,
            m.upstream_fields or {},
            load=m.load_state,
            progress=m.load_progress,
            load_error=m.load_error,
        )
        for m in rows
    }
    return SlotEntry(
        name=slot.name,
        url=slot.url,
        kind=slot.kind,
        type=slot.type,
        spoken=speaks.found_for(slot.spoken, _key(slot)),
        state=slot.state,
        last_error=slot.last_error,
        models=MappingProxyType(models),
        drift=tuple(slot.drift or ()),
        loads_models=slot.loads_models,
        model_limit=slot.model_limit,
        ejection=ejection_of(slot),
    )


class _Writes:
    """What a batch of probe results writes, gathered slot by slot and written in a few
    statements: one per kind of change for all the slots (a server found listing twenty
    models, or two hundred such servers, is one insert)."""

    def __init__(self) -> None:
        self.dropped: list[int] = []
        self.with_fields: list[SlotModel] = []
        self.with_load: list[SlotModel] = []
        self.added: list[dict[str, Any]] = []  # new model rows: their fields' values
        self.slots: dict[str, tuple[dict[str, Any], list[int]]] = {}  # values -> slot ids
        self.spoken: list[Slot] = []  # slots whose server was found to speak otherwise
        self.now = timezone.now()  # when each state written here changed: this write
        self.said: list[tuple[str, str, str]] = []  # (slot, its new state, the error)
        self.said_ejection: list[tuple[str, str]] = []  # (slot, how its ejection ended)

    def models(self, slot: Slot, rows: list[SlotModel], change: Changes, obs: Observation) -> None:
        from dispatch.models import ModelSource

        self.dropped += [m.pk for m in rows if m.model_id in change.dropped]
        for m in rows:
            if m.model_id in change.dropped:
                continue
            fields = change.fields.get(m.model_id)
            if fields is not None:
                m.upstream_fields = dict(fields)
                self.with_fields.append(m)
            load = change.loads.get(m.upstream_model)
            if load is not None:
                set_load(m, load)
                self.with_load.append(m)
        details = obs.details or {}
        said = obs.loads.models if obs.loads is not None else {}
        for i, model_id in enumerate(change.added):
            load = ModelLoad(states.LOADED)  # a server that says nothing of loading: loaded
            if obs.loads is not None:
                load = said.get(model_id) or ModelLoad(states.UNLOADED)
            self.added.append(
                {
                    "slot_id": slot.pk,
                    "model_id": model_id,
                    "upstream_model": model_id,
                    "source": ModelSource.DISCOVERED,
                    "is_default": change.first_is_default and i == 0,
                    "upstream_fields": dict(details.get(model_id) or {}),
                    "load_state": load.state,
                    "load_progress": load.progress,
                    "load_error": load.error,
                }
            )

    def slot(self, slot: Slot, change: Changes, obs: Observation) -> bool:
        """The slot's own row's new values; True if it changes."""
        values: dict[str, Any] = {}
        if change.state is not None:
            values.update(state=change.state, state_changed_at=self.now)
            self.said.append((slot.name, change.state, obs.error))
        if change.last_error is not None:
            values["last_error"] = change.last_error
        if change.drift is not None:
            values["drift"] = list(change.drift)
        if change.loads_models is not None:
            values["loads_models"] = change.loads_models
        if change.model_limit is not None:
            values["model_limit"] = change.model_limit
        if change.ejection is not None:
            # Ended: back in rotation, the count kept (the next ejection lasts longer until a
            # request succeeds); cleared: forgotten, the slot went down or came back up.
            values.update(ejected_until=None, ejected_reason="")
            if change.ejection == CLEARED:
                values["ejections"] = 0
            if slot.ejected_until is not None:
                self.said_ejection.append((slot.name, _ejection_ends(change)))
        if values:
            # Slots given the same values are written by one statement: a round that finds
            # 200 servers ready writes each the same state (json: lists as a key).
            key = json.dumps(values, sort_keys=True, default=str)
            self.slots.setdefault(key, (values, []))[1].append(slot.pk)
        if change.spoken is not None:
            # Of its own URL, so never the same as another's: one statement for them all.
            slot.spoken = speaks.stored(_key(slot), change.spoken)
            self.spoken.append(slot)
        return bool(values) or change.spoken is not None

    def flush(self) -> None:
        from dispatch.models import Slot, SlotModel

        # Dropped first: a new default may take the place of one that goes.
        if self.dropped:
            SlotModel.objects.filter(pk__in=self.dropped).delete()
        if self.with_fields:
            SlotModel.objects.bulk_update(self.with_fields, ["upstream_fields"])
        if self.with_load:
            SlotModel.objects.bulk_update(self.with_load, LOAD_FIELDS)
        if self.added:
            _insert_models(self.added)
        for values, ids in self.slots.values():
            Slot.objects.filter(pk__in=ids).update(**values)
        if self.spoken:
            Slot.objects.bulk_update(self.spoken, ["spoken"])
        if any(
            (self.dropped, self.with_fields, self.with_load, self.added, self.slots, self.spoken)
        ):
            # Bulk writes send no model signals: have this process reload after the commit,
            # as any change does (dispatch.signals).
            sync.reload_after_commit()
        for name, state, error in self.said:
            log.info("slot %s is %s%s", name, state, f" ({error})" if error else "")
        for name, ended in self.said_ejection:
            log.info("slot %s: %s", name, ended)


def _ejection_ends(change: Changes) -> str:
    if change.ejection != CLEARED:
        return "back in rotation, a probe passed after its back-off"
    if change.state is not None:
        return f"its ejection forgotten, the watcher found it {change.state}"
    return "its ejection forgotten, it is not ready"


LOAD_FIELDS = ["load_state", "load_progress", "load_error"]


def _insert_models(rows: list[dict[str, Any]]) -> None:
    """New model rows, by the values of their fields (the fields not given take their
    defaults), in one statement: one JSON document the database reads back as rows. Not
    ``bulk_create``: a model instance and each field's preparation were most of the first
    round's write (3,800 rows found on 200 servers); nor a parameter per value, which
    psycopg quotes one by one in Python (Django binds on the client)."""
    from django.db import connection

    from dispatch.models import SlotModel

    meta = SlotModel._meta
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    defaults = {f.attname: f.get_default() for f in fields}
    # As Django writes a JSONField (the standard library: any integer, where orjson stops at
    # 64 bits).
    document = json.dumps([{**defaults, **row} for row in rows])
    quote = connection.ops.quote_name
    columns = ", ".join(quote(str(f.column)) for f in fields)
    if connection.vendor == "postgresql":
        typed = ", ".join(f"{quote(f.attname)} {f.db_type(connection)}" for f in fields)
        values = ", ".join(quote(f.attname) for f in fields)
        source = f"jsonb_to_recordset(%s::jsonb) AS r({typed})"
    else:  # SQLite: JSON objects come out as their text, as Django keeps a JSONField there
        values = ", ".join(f"json_extract(value, '$.{f.attname}')" for f in fields)
        source = "json_each(%s)"
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {quote(meta.db_table)} ({columns}) SELECT {values} FROM {source}",
            [document],
        )


def _key(slot: Slot) -> str:
    """What a finding of what the slot speaks is of (``dispatch.routing.speaks.key``)."""
    return speaks.key(slot.kind, slot.type, slot.url)


def set_load(row: SlotModel, load: ModelLoad) -> None:
    row.load_state, row.load_progress, row.load_error = load.state, load.progress, load.error


async def save(name: str, obs: Observation) -> bool | None:
    """Write a probe result, with the others that come while a write is under way, trying
    again while the database is briefly unavailable. What :func:`apply` says (or raises).

    A result that finds no write under way is written at once, alone: a lone change reaches
    every process as fast as before. Results that come while one is (a first round over many
    slots) wait for it and are written together, in one transaction and one reload.

    If every try fails the result is dropped with a warning (None), not lost: the table
    still holds the old state, so the next probe differs from it and writes again.
    """
    global _writer
    loop = asyncio.get_running_loop()
    if _writer is None or _writer.loop is not loop:
        _writer = _Writer(loop)  # the first on this loop (a test's, a command's)
    return await _writer.save(name, obs)


class _Writer:
    """Probe results waiting to be written on one event loop, and the one task writing them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._waiting: list[tuple[str, Observation, asyncio.Future[bool | None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def save(self, name: str, obs: Observation) -> bool | None:
        fut: asyncio.Future[bool | None] = self.loop.create_future()
        self._waiting.append((name, obs, fut))
        if self._task is None or self._task.done():
            # A fresh context, as the watcher's probes have: not a request's executor.
            self._task = self.loop.create_task(
                self._run(), name="hal0-probe-writer", context=contextvars.Context()
            )
        return await fut

    async def _run(self) -> None:
        while self._waiting:
            # A result whose probe was cancelled (the watcher stopped) is not written.
            batch = [w for w in self._waiting if not w[2].done()]
            self._waiting = []
            if not batch:
                continue
            try:
                results = await _save_batch([(name, obs) for name, obs, _ in batch])
            except asyncio.CancelledError:
                for _, _, fut in batch:
                    fut.cancel()
                raise
            except Exception as exc:  # not the database being away: every waiter hears it
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, _, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


_writer: _Writer | None = None


def forget() -> None:
    """Forget the writer and what waits for it (a finished loop's): the next result starts
    one anew. (One on another loop is never reused anyway.)"""
    global _writer
    _writer = None


async def idle() -> None:
    """Return once no probe result is being written on this loop (the watcher's stop: a
    write under way finishes, those still waiting are dropped with their cancelled probes)."""
    task = _writer._task if _writer is not None else None
    if task is not None and task.get_loop() is asyncio.get_running_loop():
        await asyncio.gather(asyncio.shield(task), return_exceptions=True)


async def _save_batch(
    batch: list[tuple[str, Observation]],
) -> list[bool | Exception | None]:
    """:func:`apply_all`, tried again while the database is briefly away; None for each
    result when every try failed."""
    pauses = iter(SAVE_RETRY_PAUSES_S)
    while True:
        try:
            return list(await sync_to_async(apply_all, thread_sensitive=True)(batch))
        except OperationalError as exc:
            pause = next(pauses, None)
            if pause is None:
                names = [name for name, _ in batch]
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                log.warning(
                    "could not save the probe of slot %s (%s); the next probe saves it",
                    ", ".join(names[:5]) + more,
                    exc,
                )
                return [None] * len(batch)
        await asyncio.sleep(pause)


def write_loads(
    slot_name: str,
    loads: Mapping[str, ModelLoad],
    used: Mapping[str, float] | None = None,
    done: Iterable[str] = (),
) -> None:
    """The loader's writes (sync, one transaction): new load states by upstream model id
    (every row naming it, aliases too), when models were last used, and the operator's
    wishes it has acted on (``done``: upstream ids whose ``wanted`` is cleared)."""
    from dispatch.models import Slot, StateVersion

    close_old_connections()
    finished = set(done)
    with transaction.atomic():
        StateVersion.lock()
        slot = Slot.objects.select_for_update().filter(name=slot_name).first()
        if slot is None:
            return
        for row in slot.models.all():
            fields: list[str] = []
            load = loads.get(row.upstream_model)
            if load is not None and (row.load_state, row.load_progress, row.load_error) != (
                load.state,
                load.progress,
                load.error,
            ):
                set_load(row, load)
                fields += LOAD_FIELDS
            at = (used or {}).get(row.upstream_model)
            if at is not None and at > row.last_used_at:
                row.last_used_at = at
                fields.append("last_used_at")
            if row.wanted and row.upstream_model in finished:
                row.wanted = ""
                fields.append("wanted")
            if fields:
                row.save(update_fields=fields)


async def save_loads(
    slot_name: str,
    loads: Mapping[str, ModelLoad],
    used: Mapping[str, float] | None = None,
    done: Iterable[str] = (),
) -> bool:
    """:func:`write_loads`, tried again while the database is briefly away. False when
    every try failed (the loader's next step writes again)."""
    for pause in (*SAVE_RETRY_PAUSES_S, None):
        try:
            await sync_to_async(write_loads, thread_sensitive=True)(slot_name, loads, used, done)
            return True
        except OperationalError as exc:
            if pause is None:
                log.warning("could not save the model loads of slot %s (%s)", slot_name, exc)
                return False
            await asyncio.sleep(pause)
    return False
