"""The one listener list the lower rooms keep (admission, outliers, the table store)."""

from __future__ import annotations

import logging

import pytest

from dispatch.coordination.store import TableStore
from dispatch.lib.listeners import Listeners
from dispatch.routing.table import EMPTY_TABLE, RoutingTable
from dispatch.upstream.admission import Admission
from dispatch.upstream.outliers import Outliers
from tests.test_outliers import Clock, Row


def test_listeners_hear_in_the_order_added_with_what_notify_is_given():
    heard: list[tuple[str, int, str]] = []
    listeners: Listeners[[int, str]] = Listeners("test")
    listeners.add(lambda n, s: heard.append(("first", n, s)))
    listeners.add(lambda n, s: heard.append(("second", n, s)))
    listeners.notify(1, "a")
    listeners.notify(n=2, s="b")
    assert heard == [("first", 1, "a"), ("second", 1, "a"), ("first", 2, "b"), ("second", 2, "b")]


def test_a_listener_that_raises_is_logged_and_the_rest_still_run(caplog):
    heard: list[str] = []
    listeners: Listeners[[str]] = Listeners("the test room")

    def broken(slot: str) -> None:
        raise RuntimeError("a bug")

    listeners.add(broken)
    listeners.add(heard.append)
    with caplog.at_level(logging.ERROR, logger="hal0.listeners"):
        listeners.notify("a")  # does not raise
    assert heard == ["a"]
    [record] = caplog.records
    assert "the test room" in record.getMessage() and record.exc_info is not None


def test_remove_undoes_an_add():
    heard: list[str] = []
    listeners: Listeners[[str]] = Listeners("test")

    def upper(s: str) -> None:
        heard.append(s.upper())

    listeners.add(heard.append)
    listeners.add(upper)
    listeners.remove(upper)
    listeners.notify("a")
    listeners.remove(heard.append)
    listeners.notify("b")
    assert heard == ["a"] and len(listeners) == 0
    with pytest.raises(ValueError):
        listeners.remove(heard.append)


def test_a_listener_may_remove_itself_while_it_is_called():
    heard: list[str] = []
    listeners: Listeners[[str]] = Listeners("test")

    def once(slot: str) -> None:
        heard.append("once")
        listeners.remove(once)

    listeners.add(once)
    listeners.add(heard.append)
    listeners.notify("a")
    listeners.notify("b")
    assert heard == ["once", "a", "b"]


async def test_each_room_tells_every_listener_even_after_one_fails():
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    admission, slots = Admission(), list[str]()
    admission.on_change(broken)
    admission.on_change(slots.append)
    assert admission.try_acquire("a", 1)  # the place is taken though a listener failed
    admission.release("a")
    assert slots == ["a", "a"] and dict(admission.inflight) == {}

    row = Row(Clock())
    outliers, ejected = Outliers(row.clock, row), list[str]()
    outliers.on_change(broken)
    outliers.on_change(ejected.append)
    for _ in range(3):
        outliers.failed(row.entry(), "timed out", 10)
    assert ejected == ["a"] and outliers.degraded(row.entry())

    store, tables = TableStore(), list[RoutingTable]()
    store.on_change(broken)
    store.on_change(lambda old, new: tables.append(new))
    new = RoutingTable.build(7, [])
    store.publish(new)
    assert store.table is new and tables == [new] and new is not EMPTY_TABLE
