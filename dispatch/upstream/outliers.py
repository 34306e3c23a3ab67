"""Outlier ejection: a slot whose probes pass but whose requests fail is taken out of
rotation for a while, so requests for its models fail over at once instead of each waiting
out ``first_byte_timeout_s`` (300 s by default) on a hung server.

After ``EJECT_AFTER`` consecutive first-byte timeouts or transport failures (a refused
connection aside) from a slot the watcher calls ``ready``, the slot is ``degraded`` for a
back-off period (HAL0_OUTLIER_BACKOFF_S, doubled for each ejection without a success in
between, up to ``MAX_BACKOFF_FACTOR`` times). Once it has passed, one trial request is let
through (the others still fail over); its success, or a passing probe, brings the slot
back; its failure ejects it again at once.

A connection refused is no such failure: a server that is down fails its probes too, and
what to do about it is the watcher's (the request pokes it, ``dispatch.upstream.forward``).
A slot the watcher finds down, or back up, is forgotten here (``table_changed``) and in its
row (``dispatch.lifecycle.changes``): a server that restarted serves at once.

Failures are counted in each process (a verdict per request would cost a database write
each), but the ejection is shared: it is written to the slot's row
(``dispatch.coordination.ejections``), so every process's table carries it
(``SlotEntry.ejection``) within a second, and the watcher's passing probe ends it for all.
Until the write is done, and for as long as the database refuses it, the process that
decided honours its ejection alone (``pending``). The live UI shows both: the table's
ejections through the slot payload, this process's pending ones through ``overlay()``.
All calls but ``table_changed`` come from the one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from dispatch.coordination.ejections import written
from dispatch.lib.listeners import Listeners
from dispatch.routing.states import DEGRADED
from dispatch.routing.table import (
    MAX_BACKOFF_FACTOR,
    Ejection,
    RoutingTable,
    SlotEntry,
    next_ejection,
)

__all__ = ["EJECT_AFTER", "MAX_BACKOFF_FACTOR", "Outliers", "outliers"]

log = logging.getLogger("hal0.health")

EJECT_AFTER = 3


class Writer(Protocol):
    """Where an ejection is shared: ``dispatch.coordination.ejections.written``."""

    async def eject(self, name: str, cause: str, backoff_s: float) -> Ejection | None: ...

    async def clear(self, name: str) -> None: ...


@dataclass(slots=True)
class _Record:
    """What this process knows of a slot beyond the table's ``ejection``."""

    life: int  # the slot's life when this began (see Outliers.table_changed)
    failures: int = 0  # consecutive, while in rotation
    trial: bool = False  # the one trial request is in flight (here)
    # Decided here, not yet in the table: while its write is under way, or held here alone
    # when the database refused it.
    pending: Ejection | None = None


class Outliers:
    def __init__(self, clock: Callable[[], float] = time.time, writer: Writer = written) -> None:
        self._clock = clock  # the wall clock: ejections are compared across processes
        self._writer = writer
        self._records: dict[str, _Record] = {}
        # Bumped (by the reloading thread, one at a time) each time a slot's state changes:
        # a record of an earlier life is forgotten.
        self._lives: dict[str, int] = {}
        self._clearing: set[str] = set()  # a clear write under way
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: Listeners[[str]] = Listeners("outliers")

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(slot)`` when this process's own view of an ejection changes
        beyond what its table says (one decided here, before its write is in the table)."""
        self._listeners.add(listener)

    def reset(self) -> None:
        self._records.clear()
        self._lives.clear()
        self._clearing.clear()

    def table_changed(self, old: RoutingTable, new: RoutingTable) -> None:
        """The table store's listener (from the thread that reloaded): a slot whose state
        changed (down, back up, disabled, gone) begins a new life, and what was counted or
        decided here of its last one is forgotten, as its row's ejection is."""
        for name, before in old.slots.items():
            after = new.slots.get(name)
            if after is None or (before.state, before.enabled) != (after.state, after.enabled):
                self._lives[name] = self._lives.get(name, 0) + 1

    def _record(self, name: str) -> _Record | None:
        r = self._records.get(name)
        if r is not None and r.life != self._lives.get(name, 0):
            self._records.pop(name, None)
            return None
        return r

    def _made(self, name: str) -> _Record:
        r = self._record(name)
        if r is None:
            r = self._records[name] = _Record(self._lives.get(name, 0))
        return r

    def _ejection(self, slot: SlotEntry, r: _Record | None) -> Ejection | None:
        """The ejection in force for this process: its own pending one, else the table's."""
        if r is not None and r.pending is not None:
            return r.pending
        e = slot.ejection
        return e if e is not None and e.out else None

    def overlay(self) -> dict[str, tuple[str, str]]:
        """Ejections decided here that the table does not carry yet → (``degraded``, the
        reason), for what the UI shows over the table (which shows its own)."""
        # Read only: the live feed asks from the thread that reloaded the table too.
        return {
            name: (DEGRADED, r.pending.reason)
            for name, r in list(self._records.items())
            if r.pending is not None and r.life == self._lives.get(name, 0)
        }

    def degraded(self, slot: SlotEntry) -> str | None:
        """The reason the slot is out of rotation, or None when it is in."""
        e = self._ejection(slot, self._record(slot.name) if self._records else None)
        return e.reason if e is not None else None

    def admit(self, slot: SlotEntry) -> bool:
        """May a request go to ``slot`` now? Once the back-off has passed, one request (the
        trial) may; the caller then reports it with succeeded, failed or abandoned."""
        e = slot.ejection
        if not self._records and (e is None or not e.out):
            return True  # the usual case, on every request: no lookup
        r = self._record(slot.name)
        ejection = self._ejection(slot, r)
        if ejection is None:
            return True
        assert ejection.until is not None
        if (r is not None and r.trial) or self._clock() < ejection.until:
            return False
        self._made(slot.name).trial = True
        return True

    def retry_after(self, slot: SlotEntry) -> float:
        e = self._ejection(slot, self._record(slot.name) if self._records else None)
        if e is None or e.until is None:
            return 1.0
        return max(1.0, e.until - self._clock())

    def failed(self, slot: SlotEntry, reason: str, backoff_s: float) -> None:
        """A first-byte timeout or transport failure (not a refused connection) from a slot
        its probes call ready."""
        if backoff_s <= 0:
            return  # ejection is off
        r = self._made(slot.name)
        if self._ejection(slot, r) is not None:
            if r.trial:  # the trial failed: out again, for longer
                r.trial = False
                self._eject(slot, r, reason, backoff_s)
            return  # (a request let through before the ejection: already counted)
        r.failures += 1
        if r.failures >= EJECT_AFTER:
            self._eject(slot, r, reason, backoff_s)

    def succeeded(self, slot: SlotEntry) -> None:
        """The slot answered: its record is cleared, here and in its row, and an ejected
        slot is back."""
        e = slot.ejection
        if not self._records and e is None:
            return  # the usual case, on every request
        r = self._records.pop(slot.name, None)
        if r is not None and r.pending is not None and (e is None or not e.out):
            self._listeners.notify(slot.name)  # it showed degraded here alone
        if e is not None and slot.name not in self._clearing:
            self._clearing.add(slot.name)
            self._spawn(self._clear(slot.name))

    def abandoned(self, slot: str) -> None:
        """An admitted request ended without a verdict (client gone, slot full, a 5xx, a
        connection refused)."""
        r = self._records.get(slot)
        if r is not None:
            r.trial = False

    def _eject(self, slot: SlotEntry, r: _Record, reason: str, backoff_s: float) -> None:
        shown = self._ejection(slot, r) is not None
        before = max(
            slot.ejection.count if slot.ejection is not None else 0,
            r.pending.count if r.pending is not None else 0,
        )
        cause = f"{EJECT_AFTER} failed requests while its probes pass: {reason}"
        r.failures = 0
        r.pending = next_ejection(before, backoff_s, cause, self._clock())
        if not shown:
            self._listeners.notify(slot.name)
        self._spawn(self._share(slot.name, r, r.pending, cause, backoff_s))

    async def _share(
        self, name: str, r: _Record, pending: Ejection, cause: str, backoff_s: float
    ) -> None:
        """Write the ejection for every process; once done, the table carries it (the
        commit reloads this process's table before the write returns)."""
        try:
            made = await self._writer.eject(name, cause, backoff_s)
        except Exception as exc:  # the database is away: honoured here alone meanwhile
            log.warning(
                "slot %s: could not share its ejection (%s); this process keeps it", name, exc
            )
            return
        if self._records.get(name) is not r or r.pending is not pending:
            return  # a newer life, a success or a later ejection took its place
        r.pending = None
        if made is None:
            # The database has the slot down, disabled or gone: the watcher's, not an outlier.
            self._listeners.notify(name)

    async def _clear(self, name: str) -> None:
        try:
            await self._writer.clear(name)
        except Exception as exc:  # the next success clears it, or the watcher's probe
            log.warning("slot %s: could not clear its ejection (%s)", name, exc)
        finally:
            self._clearing.discard(name)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)


outliers = Outliers()
