"""The process's current routing table: loaded from the database, swapped atomically.

Model signals schedule a reload after the transaction commits (see ``dispatch.signals``), so
requests never query the database: they read ``store.table``, one immutable snapshot. Async
code that needs to know when the table changes (a request waiting out a model swap) awaits
``next_change()``, woken from whichever thread did the reload.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async

from dispatch import kinds
from dispatch.coordination import outages
from dispatch.lib.listeners import Listeners
from dispatch.routing import slot_fields, speaks
from dispatch.routing.table import (
    EMPTY_TABLE,
    Ejection,
    ModelEntry,
    RoutingTable,
    SlotEntry,
    make_slot,
)

if TYPE_CHECKING:
    from dispatch.models import Slot


def load_table(version: int) -> RoutingTable:
    """Read every slot and its models from the database into a new table (sync, ORM)."""
    from dispatch.models import Slot, SlotModel

    # The models as plain values, not model instances: a fleet of 200 slots of 20 models
    # each spent most of a reload making 4,000 instances (issue 24), and every process
    # reloads at every change. In SlotModel.Meta.ordering's order within each slot.
    by_slot: dict[int, list[ModelEntry]] = {}
    rows = SlotModel.objects.order_by("slot_id", "-is_default", "model_id").values_list(
        "slot_id", *_MODEL_COLUMNS
    )
    for slot_id, *model in rows:
        by_slot.setdefault(slot_id, []).append(_model_entry(*model))
    entries: list[SlotEntry] = []
    for slot in Slot.objects.order_by("name"):
        models = by_slot.get(slot.pk, [])
        # Every field the table carries (dispatch.routing.slot_fields), then those stored in
        # another shape: JSON lists, and the endpoints it speaks (dispatch.routing.speaks):
        # those listed, else what its kind of server speaks for its type as asking the
        # server found it.
        values = {f.name: getattr(slot, f.name) for f in slot_fields.TABLE}
        listed = list(slot.endpoints or ())
        endpoints, found = speaks_of(slot)
        values.update(
            drift=tuple(slot.drift or ()),
            endpoints=endpoints,
            endpoints_listed=bool(listed),
            spoken=MappingProxyType(found),
            ejection=ejection_of(slot),
        )
        entries.append(make_slot(models=models, **values))
    return RoutingTable.build(version, entries)


def ejection_of(slot: Slot) -> Ejection | None:
    """The row's ejection (``dispatch.coordination.ejections``), as the table carries it."""
    if slot.ejected_until is None and not slot.ejections:
        return None
    until = slot.ejected_until.timestamp() if slot.ejected_until is not None else None
    return Ejection(until, slot.ejected_reason, slot.ejections)


def speaks_of(slot: Slot) -> tuple[frozenset[str], dict[str, bool]]:
    """The endpoints a slot's row says its server speaks natively, and what asking the
    server found of its present kind, type and URL (``dispatch.routing.speaks``)."""
    return speaks.resolved(
        slot.endpoints or (),
        kinds.get(slot.kind).speaks(slot.type),
        slot.spoken,
        speaks.key(slot.kind, slot.type, slot.url),
    )


# What load_table reads of each model, in _model_entry's order.
_MODEL_COLUMNS = (
    "model_id",
    "upstream_model",
    "source",
    "is_default",
    "upstream_fields",
    "load_state",
    "load_progress",
    "load_error",
    "pinned",
    "last_used_at",
)


def _model_entry(
    model_id: str,
    upstream: str,
    source: str,
    default: bool,
    fields: dict[str, Any] | None,
    load: str,
    progress: float | None,
    error: str,
    pinned: bool,
    used: float,
) -> ModelEntry:
    return ModelEntry(
        model_id,
        upstream or model_id,
        source,
        default,
        MappingProxyType(dict(fields or {})),
        load=load,
        progress=progress,
        load_error=error,
        pinned=pinned,
        last_used=used,
    )


class TableStore:
    def __init__(self) -> None:
        self._listeners: Listeners[[RoutingTable, RoutingTable]] = Listeners("the table store")
        self.reset()

    def reset(self) -> None:
        """Forget the table (not the listeners): the next use loads it afresh."""
        self._table: RoutingTable = EMPTY_TABLE
        self._loaded = False
        self._lock = threading.Lock()
        self._checked_at = 0.0  # monotonic time of the last reload, changed or not
        # Set once this process follows the database (dispatch.coordination.sync): the table is stale
        # once it has not been checked against the database for this long...
        self.max_age: float | None = None
        # ...or once the watcher's last full probe round is older than this.
        self.heartbeat_max_age: float | None = None
        self.probed_at: datetime | None = None  # the watcher's heartbeat, read from the database
        self.watcher = ""  # who wrote it
        self._following_since: datetime | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        # What /healthz tells apart: a database this process cannot read (it still routes by
        # the table it has) from a table that lags a state it knows exists (it cannot).
        self.read_at: datetime | None = None  # when the database was last read
        self.unreadable_since: datetime | None = None  # since when reading it fails
        self._latest = 0  # the newest state version this process knows of
        self._behind_since: float | None = None  # monotonic: since when its table lags it

    @property
    def table(self) -> RoutingTable:
        return self._table

    @property
    def loaded(self) -> bool:
        """Whether a table was ever read from the database (else ``table`` is empty)."""
        return self._loaded

    def follow(self, max_age: float, heartbeat_max_age: float) -> None:
        self.max_age, self.heartbeat_max_age = max_age, heartbeat_max_age
        if self._following_since is None:
            self._following_since = datetime.now(UTC)

    @property
    def stale(self) -> bool:
        """True when the table may lag the truth: this process could not check the database
        lately, or the slot states in it are older than the watcher should let them be (no
        watcher runs, or it is stuck). Until a first heartbeat the clock starts when this
        process began to follow."""
        if self.max_age is not None and time.monotonic() - self._checked_at > self.max_age:
            return True
        known = self.probed_at or self._following_since
        if self.heartbeat_max_age is None or known is None:
            return False
        return (datetime.now(UTC) - known).total_seconds() > self.heartbeat_max_age

    def saw_version(self, number: int, *, told: bool = False) -> None:
        """A state version exists: read from the database (the truth, even when it went
        back, as a restored backup does), or ``told`` by another process that committed it."""
        if told and number <= self._latest:
            return
        self._latest = number
        if number <= self._table.version:
            self._behind_since = None
        elif self._behind_since is None:
            self._behind_since = time.monotonic()

    @property
    def lagging(self) -> int | None:
        """The newer version this process knows of but has not loaded for longer than
        ``max_age``, else None. Other processes route by that state; this one's table lies
        (its database reads fail, or its reload does, where theirs do not)."""
        since, latest = self._behind_since, self._latest
        if since is None or latest <= self._table.version or self.max_age is None:
            return None
        return latest if time.monotonic() - since > self.max_age else None

    def unreadable(self) -> None:
        """Reading the database failed (the version check)."""
        if self.unreadable_since is None:
            self.unreadable_since = datetime.now(UTC)

    def _read(self) -> None:
        self._checked_at = time.monotonic()
        self.read_at, self.unreadable_since = datetime.now(UTC), None

    def freshness(self) -> dict[str, object]:
        """What /healthz and the page say about it."""
        return {
            "stale": self.stale,
            "probed_at": self.probed_at.isoformat() if self.probed_at else None,
            "leader": self.watcher or None,
        }

    def reload(self) -> RoutingTable:
        """Rebuild from the database and publish (sync: call from a thread, not the loop).

        The table carries the database's ``StateVersion``, read before the rows: a change
        that commits in between leaves a newer table under an older number, which the next
        version check (``dispatch.coordination.sync``) reloads. A reload that finds nothing changed
        publishes nothing.
        """
        from dispatch.models import StateVersion

        with self._lock:
            table = load_table(StateVersion.current())
            if (
                not self._loaded
                or table.version != self._table.version
                or table.slots != self._table.slots
            ):
                self.publish(table)
            self._read()
        return self._table

    def mark_checked(
        self, probed_at: datetime | None = None, watcher: str = "", version: int | None = None
    ) -> None:
        """The database was just read: its version, and the watcher's heartbeat."""
        self._read()
        self.probed_at, self.watcher = probed_at, watcher
        if version is not None:
            self.saw_version(version)

    async def ensure_loaded(self) -> RoutingTable:
        """The table, read first if this process has none yet. With none and the database
        away: ``Unavailable`` (503 ``table_unavailable``), never an empty table (every
        model would read as unknown) nor a server error."""
        if not self._loaded:
            if not outages.DATABASE.available():
                raise _no_table()
            try:
                await sync_to_async(self.reload, thread_sensitive=True)()
            except outages.DATABASE.errors as exc:
                self.unreadable()
                outages.DATABASE.failed("reading the routing table", exc)
                raise _no_table() from exc
        return self._table

    def publish(self, table: RoutingTable) -> None:
        old, self._table, self._loaded = self._table, table, True
        if table.version >= self._latest:
            self._behind_since = None
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            if not loop.is_closed() and not fut.done():
                loop.call_soon_threadsafe(_wake, fut)
        self._listeners.notify(old, table)

    def on_change(self, listener: Callable[[RoutingTable, RoutingTable], None]) -> None:
        """Call ``listener(old, new)`` after each new table is swapped in (from the thread
        that reloaded)."""
        self._listeners.add(listener)

    def next_change(self) -> asyncio.Future[None]:
        """A future resolved when the next table is published (from any thread).

        Take it *before* looking at the table: then a change between the look and the wait
        resolves it instead of being missed. Cancel it if you stop waiting.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append((loop, fut))
        return fut


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


store = TableStore()


def _no_table() -> outages.Unavailable:
    return outages.Unavailable(
        "table_unavailable",
        "hal0web has not read its routing table yet: the database is away. Try again shortly.",
    )
