"""The wait for an upstream's response headers (``Upstream.open``), timed by the request's
own timer (dispatch/upstream/response.py, ``Timer``) rather than ``asyncio.timeout``: these
hold it to what ``asyncio.timeout`` did there. Its time up, the wait is an
``UpstreamError("timeout")``; a cancel from outside (the client's disconnect cancels the
request's task) stays a cancel, even when it meets the timer; the task's count of cancel
requests is left as it was; and once the headers are in, the timer is gone: a body slower
than first_byte_timeout_s is the idle timeout's to judge, not the header wait's.

The answer the timer and its rules also time, piece by piece, is tests/test_read_clock.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine

import httpx
import pytest

from dispatch.routing.table import ModelEntry, SlotEntry, make_slot
from dispatch.upstream.client import Upstream
from dispatch.upstream.response import UpstreamError

BODY = b'{"model": "m1", "messages": []}'
Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def _slot(**fields: object) -> SlotEntry:
    return make_slot(
        "solo", "http://127.0.0.1:9/v1", [ModelEntry("m1", "m1", "manifest")], **fields
    )


def upstream(handler: Handler) -> Upstream:
    return Upstream(httpx.MockTransport(handler))


async def _never(request: httpx.Request) -> httpx.Response:
    await asyncio.Event().wait()
    raise AssertionError("never answers")


class _Slow(httpx.AsyncByteStream):
    """A body whose one piece comes after ``gap`` seconds."""

    def __init__(self, gap: float) -> None:
        self.gap = gap

    async def __aiter__(self) -> AsyncIterator[bytes]:
        await asyncio.sleep(self.gap)
        yield b'{"ok": true}'


async def test_no_answer_in_first_byte_timeout_s_is_a_timeout() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamError) as caught:
        await upstream(_never).open(_slot(first_byte_timeout_s=0.2), "chat/completions", BODY, {})
    assert caught.value.kind == "timeout"
    assert caught.value.message == "slot 'solo' sent no response within 0.2s"
    assert 0.15 <= loop.time() - started < 1.0


async def test_max_duration_s_shorter_than_the_wait_says_so() -> None:
    slot = _slot(first_byte_timeout_s=30.0, max_duration_s=0.2)
    with pytest.raises(UpstreamError) as caught:
        await upstream(_never).open(slot, "chat/completions", BODY, {})
    assert caught.value.kind == "timeout"
    assert caught.value.message == (
        "slot 'solo': the request ran past its max_duration_s of 0.2s before any answer"
    )


async def test_a_timeout_leaves_the_tasks_cancel_count_as_it_was() -> None:
    # Its own cancel withdrawn (Task.uncancel): a later asyncio.timeout or TaskGroup in the
    # same task would take a count left behind for a cancel still to come.
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(UpstreamError):
        await upstream(_never).open(_slot(first_byte_timeout_s=0.1), "chat/completions", BODY, {})
    assert task.cancelling() == 0
    await asyncio.sleep(0.05)  # and no cancel is left pending either


async def test_a_cancel_from_outside_is_no_timeout() -> None:
    up = upstream(_never)
    task = asyncio.ensure_future(
        up.open(_slot(first_byte_timeout_s=5.0), "chat/completions", BODY, {})
    )
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancel_from_outside_meeting_the_timeout_stays_a_cancel() -> None:
    async def cancelled_meanwhile(request: httpx.Request) -> httpx.Response:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # The timer's cancel, and the client's disconnect in the same moment.
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            raise
        raise AssertionError("never answers")

    up = upstream(cancelled_meanwhile)
    task = asyncio.ensure_future(
        up.open(_slot(first_byte_timeout_s=0.1), "chat/completions", BODY, {})
    )
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_timer_is_gone_once_the_headers_are_in() -> None:
    async def headers_now_body_later(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Slow(0.5))

    up = upstream(headers_now_body_later)
    slot = _slot(first_byte_timeout_s=0.2, idle_timeout_s=5.0)
    response = await up.open(slot, "chat/completions", BODY, {})
    assert await response.read(2**20) == b'{"ok": true}'


async def test_an_answer_in_time_is_given() -> None:
    async def soon(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return httpx.Response(200, content=b"in time")

    response = await upstream(soon).open(
        _slot(first_byte_timeout_s=0.5), "chat/completions", BODY, {}
    )
    assert await response.read(2**20) == b"in time"
    await asyncio.sleep(0.6)  # past first_byte_timeout_s: nothing cancels this task now
