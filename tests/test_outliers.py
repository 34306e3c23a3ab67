"""Outlier ejection's rules, on a fake clock (the live behaviour is in test_faults)."""

from __future__ import annotations

from dispatch.upstream.outliers import EJECT_AFTER, Outliers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ejected(clock: Clock, backoff: float = 10) -> Outliers:
    o = Outliers(clock)
    for _ in range(EJECT_AFTER):
        assert o.admit("a")
        o.failed("a", "timed out", backoff)
    return o


def test_three_consecutive_failures_eject_and_a_success_in_between_resets():
    o = Outliers(Clock())
    changed: list[str] = []
    o.on_change(changed.append)
    o.failed("a", "x", 10)
    o.failed("a", "x", 10)
    o.succeeded("a")
    o.failed("a", "x", 10)
    o.failed("a", "x", 10)
    assert o.admit("a") and not changed
    o.failed("a", "timed out", 10)
    assert not o.admit("a") and changed == ["a"]
    assert o.overlay() == {"a": ("degraded", o.degraded("a"))}
    assert "timed out" in (o.degraded("a") or "")


def test_after_the_backoff_one_trial_goes_through_and_its_success_brings_the_slot_back():
    clock = Clock()
    o = ejected(clock)
    assert o.retry_after("a") == 10
    clock.now += 10
    assert o.admit("a")  # the trial
    assert not o.admit("a")  # only one at a time
    o.succeeded("a")
    assert o.admit("a") and o.admit("a") and o.overlay() == {}


def test_a_failed_trial_ejects_again_for_twice_as_long():
    clock = Clock()
    o = ejected(clock)
    clock.now += 10
    assert o.admit("a")
    o.failed("a", "again", 10)
    assert not o.admit("a") and o.retry_after("a") == 20
    clock.now += 20
    assert o.admit("a")
    o.abandoned("a")  # the client went away: the next request is the trial
    assert o.admit("a")


def test_a_passing_probe_brings_it_back_only_after_the_backoff():
    clock = Clock()
    o = ejected(clock)
    o.probe_passed("a")
    assert not o.admit("a")
    clock.now += 10
    o.probe_passed("a")
    assert o.admit("a") and o.overlay() == {}
    for _ in range(EJECT_AFTER):  # no success in between: the back-off has grown
        o.failed("a", "x", 10)
    assert o.retry_after("a") == 20


def test_late_failures_of_requests_admitted_before_the_ejection_do_not_extend_it():
    clock = Clock()
    o = ejected(clock)
    o.failed("a", "late", 10)
    assert o.retry_after("a") == 10


def test_backoff_zero_turns_ejection_off():
    o = Outliers(Clock())
    for _ in range(10):
        o.failed("a", "x", 0)
    assert o.admit("a") and o.overlay() == {}
