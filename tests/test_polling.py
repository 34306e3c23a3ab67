"""The suite's one poll loop (tests/polling.py): it returns what it waited for, and a
timeout says what was awaited and what was last seen."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.polling import await_until, wait_until


def test_it_returns_the_first_true_answer() -> None:
    calls = itertools.count(1)
    assert wait_until(lambda: "done" if next(calls) == 3 else "", "the third call", every=0) == (
        "done"
    )
    assert next(calls) == 4  # not called again once answered


def test_a_timeout_names_what_was_awaited_and_the_last_answer() -> None:
    states = iter(["offline", "loading", "loading", "loading", "loading", "loading", "loading"])
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        wait_until(lambda: next(states) == "ready", "slot a to be ready", timeout=0.1, every=0.02)
    assert time.monotonic() - started >= 0.1
    assert str(failed.value) == (
        "timed out after 0.1 s waiting for slot a to be ready; last saw False"
    )
    with pytest.raises(AssertionError, match=r"waiting for the models; last saw \{\}"):
        wait_until(dict, "the models", timeout=0)


def test_a_yes_or_no_check_can_show_what_it_looked_at() -> None:
    states = {"a": "loading"}
    with pytest.raises(AssertionError) as failed:
        wait_until(lambda: states["a"] == "ready", "a ready", timeout=0, show=lambda: states)
    assert str(failed.value).endswith("waiting for a ready; now {'a': 'loading'}")


def test_what_is_shown_as_text_reads_as_lines() -> None:
    with pytest.raises(AssertionError) as failed:
        wait_until(lambda: False, "a line", timeout=0, show=lambda: "one\ntwo")
    assert str(failed.value).endswith("waiting for a line; now:\none\ntwo")


def test_an_error_in_the_check_fails_at_once() -> None:
    def check() -> bool:
        raise KeyError("slot a")

    started = time.monotonic()
    with pytest.raises(KeyError):
        wait_until(check, "slot a", timeout=5)
    assert time.monotonic() - started < 1


async def test_the_async_twin_lets_the_loop_run_while_it_waits() -> None:
    import asyncio

    done: list[str] = []

    async def finish_later() -> None:
        await asyncio.sleep(0.05)
        done.append("done")

    task = asyncio.create_task(finish_later())  # runs only while the wait yields the loop
    assert await await_until(lambda: done, "the task to finish", every=0.01) == ["done"]
    await task
    with pytest.raises(AssertionError, match="waiting for never; last saw None"):
        await await_until(lambda: None, "never", timeout=0.05, every=0.01)
