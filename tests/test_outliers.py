"""Outlier ejection's rules, on a fake clock (the live behaviour is in test_faults, across
worker processes in test_outliers_workers).

Two ``Outliers`` stand for two processes; ``Row`` for the slot's row they share: what the
writer wrote there is what each process's next table carries (``entry()``). The writes
themselves, on a real database, are at the end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from dispatch.routing.table import EMPTY_TABLE, Ejection, RoutingTable, make_slot, next_ejection
from dispatch.upstream.outliers import EJECT_AFTER, Outliers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Row:
    """The slot's row as dispatch.coordination.ejections writes it (its rules, in memory)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.state = "ready"
        self.ejection: Ejection | None = None
        self.refuse: Exception | None = None  # the database is away
        self.writes = 0

    def entry(self):
        """The slot as every process's table has it once it followed the row."""
        return make_slot("a", "http://h/v1", state=self.state, ejection=self.ejection)

    async def eject(self, name: str, cause: str, backoff_s: float) -> Ejection | None:
        if self.refuse is not None:
            raise self.refuse
        if self.state != "ready":
            return None
        e = self.ejection
        if e is not None and e.until is not None and self.clock() < e.until:
            return e
        self.writes += 1
        self.ejection = next_ejection(e.count if e else 0, backoff_s, cause, self.clock())
        return self.ejection

    async def clear(self, name: str) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.writes += 1
        self.ejection = None


async def settle() -> None:
    """Let the writes the calls started finish."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def row(clock: Clock) -> Row:
    return Row(clock)


async def eject(o: Outliers, row: Row, backoff: float = 10) -> None:
    for _ in range(EJECT_AFTER):
        assert o.admit(row.entry())
        o.failed(row.entry(), "timed out", backoff)
    await settle()


async def test_three_consecutive_failures_eject_and_a_success_in_between_resets(clock, row):
    o = Outliers(clock, row)
    changed: list[str] = []
    o.on_change(changed.append)
    for _ in range(2):
        o.failed(row.entry(), "x", 10)
    o.succeeded(row.entry())
    for _ in range(2):
        o.failed(row.entry(), "x", 10)
    assert o.admit(row.entry()) and not changed and row.ejection is None
    o.failed(row.entry(), "timed out", 10)
    # Honoured here at once, before the write is done: shown through the overlay.
    assert not o.admit(row.entry()) and changed == ["a"]
    assert o.overlay() == {"a": ("degraded", o.degraded(row.entry()))}
    await settle()
    # Written: the table carries it now, the overlay no longer.
    assert row.ejection is not None and row.ejection.until == 110
    assert "timed out" in row.ejection.reason and "out of rotation for 10s" in row.ejection.reason
    assert o.overlay() == {} and changed == ["a"]
    assert o.degraded(row.entry()) == row.ejection.reason and not o.admit(row.entry())


async def test_one_process_ejects_and_every_other_honours_it(clock, row):
    ejecting, other = Outliers(clock, row), Outliers(clock, row)
    await eject(ejecting, row)
    entry = row.entry()
    assert not other.admit(entry) and other.degraded(entry) == row.ejection.reason
    assert other.retry_after(entry) == 10
    # It never failed there; its requests' late failures change nothing.
    other.failed(entry, "late", 10)
    await settle()
    assert row.writes == 1 and row.ejection.until == 110


async def test_after_the_backoff_one_trial_per_process_and_its_success_ends_it_everywhere(
    clock, row
):
    ejecting, other = Outliers(clock, row), Outliers(clock, row)
    await eject(ejecting, row)
    clock.now += 10
    assert other.admit(row.entry())  # the trial, there
    assert not other.admit(row.entry())  # only one at a time
    other.succeeded(row.entry())
    await settle()
    assert row.ejection is None
    assert ejecting.admit(row.entry()) and ejecting.admit(row.entry()) and other.admit(row.entry())


async def test_a_failed_trial_ejects_again_for_twice_as_long(clock, row):
    o = Outliers(clock, row)
    await eject(o, row)
    clock.now += 10
    assert o.admit(row.entry())
    o.failed(row.entry(), "again", 10)
    assert not o.admit(row.entry()) and o.retry_after(row.entry()) == 20
    await settle()
    assert row.ejection.count == 2 and o.retry_after(row.entry()) == 20
    clock.now += 20
    assert o.admit(row.entry())
    o.abandoned("a")  # the client went away: the next request is the trial
    assert o.admit(row.entry())


async def test_an_ejection_ended_by_a_probe_lasts_longer_next_time_until_a_success(clock, row):
    o = Outliers(clock, row)
    await eject(o, row)
    clock.now += 10
    row.ejection = Ejection(None, "", 1)  # what the watcher's passing probe writes
    assert o.admit(row.entry()) and o.degraded(row.entry()) is None
    await eject(o, row)
    assert row.ejection.count == 2 and o.retry_after(row.entry()) == 20
    row.ejection = Ejection(None, "", 2)
    o.succeeded(row.entry())  # a request that succeeds forgets the count in the row
    await settle()
    assert row.ejection is None


async def test_a_slot_the_database_has_down_is_not_ejected(clock, row):
    o = Outliers(clock, row)
    changed: list[str] = []
    o.on_change(changed.append)
    row.state = "offline"  # the watcher wrote it; this process's table is behind
    await eject(o, row)
    assert row.ejection is None and o.overlay() == {}
    assert changed == ["a", "a"]  # shown degraded here a moment, then not
    assert o.admit(make_slot("a", "http://h/v1", state="ready"))


async def test_while_the_database_refuses_the_process_that_decided_honours_it_alone(clock, row):
    ejecting, other = Outliers(clock, row), Outliers(clock, row)
    row.refuse = OSError("database away")
    await eject(ejecting, row)
    assert not ejecting.admit(row.entry()) and ejecting.overlay()
    assert other.admit(row.entry())
    clock.now += 10
    assert ejecting.admit(row.entry())  # its trial
    ejecting.succeeded(row.entry())
    assert ejecting.overlay() == {} and ejecting.admit(row.entry())


async def test_a_slot_found_down_or_back_up_begins_afresh(clock, row):
    o = Outliers(clock, row)
    for _ in range(EJECT_AFTER - 1):
        o.failed(row.entry(), "reset", 10)
    ready = row.entry()
    down = make_slot("a", "http://h/v1", state="offline")

    def table(slot) -> RoutingTable:
        return RoutingTable.build(1, [slot])

    o.table_changed(table(ready), table(down))  # (from the thread that reloaded)
    o.table_changed(table(down), table(ready))
    o.failed(row.entry(), "reset", 10)
    await settle()
    assert o.admit(row.entry()) and row.ejection is None
    # A pending ejection of an earlier life is forgotten too.
    row.refuse = OSError("database away")
    for _ in range(EJECT_AFTER - 1):  # (one counted above)
        o.failed(row.entry(), "reset", 10)
    await settle()
    assert o.overlay() and not o.admit(row.entry())
    o.table_changed(table(ready), EMPTY_TABLE)
    assert o.overlay() == {} and o.admit(row.entry())


async def test_late_failures_of_requests_admitted_before_the_ejection_do_not_extend_it(clock, row):
    o = Outliers(clock, row)
    await eject(o, row)
    o.failed(row.entry(), "late", 10)
    await settle()
    assert o.retry_after(row.entry()) == 10 and row.writes == 1


async def test_backoff_zero_turns_ejection_off(clock, row):
    o = Outliers(clock, row)
    for _ in range(10):
        o.failed(row.entry(), "x", 0)
    await settle()
    assert o.admit(row.entry()) and o.overlay() == {} and row.ejection is None


async def test_the_usual_request_leaves_nothing_behind(clock, row):
    o = Outliers(clock, row)
    assert o.admit(row.entry())
    o.succeeded(row.entry())
    await settle()
    assert not o._records and row.writes == 0


# --- the writes, on the database -------------------------------------------------------------


def _row_ejection():
    from dispatch.coordination.store import load_table

    return load_table(1).slots["a"].ejection


def test_an_ejection_is_written_to_a_ready_slots_row_and_doubles_in_a_row(transactional_db):
    from dispatch.coordination.ejections import write_cleared, write_ejection
    from dispatch.models import Slot
    from tests.conftest import add_slot

    add_slot("a", "http://127.0.0.1:9/v1", ["m1"], state="ready")
    made = write_ejection("a", "3 failed requests: timed out", 30)
    assert made is not None and made.count == 1
    assert made.reason == "taken out of rotation for 30s after 3 failed requests: timed out"
    assert _row_ejection() == made
    assert write_ejection("a", "later", 30) == made  # in force: it stands
    # Past its back-off (as a trial that failed finds it): again, for twice as long.
    Slot.objects.filter(name="a").update(ejected_until=datetime.now(UTC) - timedelta(seconds=1))
    again = write_ejection("a", "the trial failed", 30)
    assert again is not None and again.count == 2 and "for 60s" in again.reason
    assert write_cleared("a") and _row_ejection() is None
    assert not write_cleared("a")  # nothing left: nothing written


def test_a_slot_that_is_not_ready_is_not_ejected(transactional_db):
    from dispatch.coordination.ejections import write_ejection
    from tests.conftest import add_slot

    add_slot("a", "http://127.0.0.1:9/v1", ["m1"], state="offline")
    assert write_ejection("a", "refused", 30) is None and _row_ejection() is None
    assert write_ejection("nobody", "refused", 30) is None
