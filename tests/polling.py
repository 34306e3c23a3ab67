"""Waiting for something another thread or process does: one poll loop for the whole suite.

hal0web, the fakes and the watcher run beside the test (threads, processes), so a test that
needs their effect polls for it. ``wait_until`` (and ``await_until`` inside an event loop)
call a check until it answers something true and return that answer; on timeout the test
fails with what it waited for and the last answer seen, which is usually why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

EVERY_S = 0.05


def _timed_out(
    what: str, timeout: float, last: object, show: Callable[[], object] | None
) -> AssertionError:
    if show is None:
        seen = f"last saw {last!r}"
    else:
        now = show()
        seen = f"now:\n{now}" if isinstance(now, str) else f"now {now!r}"  # a log reads as lines
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}; {seen}")


def wait_until(
    check: Callable[[], T],
    what: str,
    timeout: float = 5.0,
    every: float = EVERY_S,
    show: Callable[[], object] | None = None,
) -> T:
    """Call ``check`` until it returns something true, and return that; fail after
    ``timeout`` seconds naming ``what`` and the last value seen, or what ``show`` says then
    when the check only answers yes or no. An exception from ``check`` fails at once: a
    check that may fail on the way catches what it expects itself."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last, show)
        time.sleep(every)


async def await_until(
    check: Callable[[], T],
    what: str,
    timeout: float = 5.0,
    every: float = EVERY_S,
    show: Callable[[], object] | None = None,
) -> T:
    """``wait_until`` for a test running in an event loop: the same loop, sleeping without
    blocking the loop (what it waits for is done by another thread or process)."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last, show)
        await asyncio.sleep(every)


def logged(count: int = 1, **filters: object) -> list[Any]:
    """The request-log rows matching ``filters``, once ``count`` of them are written.

    A decision is recorded at the server loop's next turn after its answer went out (issue
    23), so a client that has its answer can be a moment ahead of the row: the writer's
    ``flush`` covers only rows already offered to it."""
    from dispatch.models import RequestLog

    def written() -> list[Any]:
        rows = list(RequestLog.objects.filter(**filters))
        return rows if len(rows) >= count else []

    return wait_until(written, f"{count} request-log row(s) with {filters}", 10)


def decision_lines(caplog: Any, count: int = 1) -> list[dict[str, Any]]:
    """The ``hal0.dispatch`` JSON log lines caplog has, once it has ``count`` of them (a
    decision is logged at the server loop's next turn after its answer: issue 23). Call it
    inside ``caplog.at_level``, which lets the lines through."""
    import json

    def lines() -> list[dict[str, Any]]:
        found = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hal0.dispatch"]
        return found if len(found) >= count else []

    return wait_until(lines, f"{count} decision log line(s)", 10)
