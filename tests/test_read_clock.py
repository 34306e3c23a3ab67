"""A body's read timed piece by piece (``UpstreamResponse.chunks``): the idle timeout counts
only the upstream's silence while a read waits, never the time the consumer takes with a
piece, and ``max_duration_s`` caps the whole read however steadily pieces come.

The clock that keeps both is looked at now and then rather than set around every read
(dispatch/upstream/response.py, ``_ReadClock``): these hold it to the behaviour of a timeout
set around each read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from dispatch.upstream.response import UpstreamError, UpstreamResponse


class _Paced(httpx.AsyncByteStream):
    """A body whose pieces come after the given gaps (seconds)."""

    def __init__(self, gaps: list[float]) -> None:
        self.gaps = gaps

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, gap in enumerate(self.gaps):
            await asyncio.sleep(gap)
            yield b"piece %d;" % i


def _answer(gaps: list[float], idle: float, max_duration: float | None = None) -> UpstreamResponse:
    deadline = None
    if max_duration is not None:
        deadline = asyncio.get_running_loop().time() + max_duration
    response = httpx.Response(200, stream=_Paced(gaps))
    return UpstreamResponse(response, idle, deadline, max_duration or 0.0)


async def _read(answer: UpstreamResponse, hold: float = 0.0) -> list[bytes]:
    got = []
    async for chunk in answer.chunks():
        got.append(chunk)
        await asyncio.sleep(hold)  # the consumer passing the piece on
    return got


async def test_pieces_within_the_idle_timeout_all_arrive_over_many_idle_periods() -> None:
    got = await _read(_answer([0.05] * 16, idle=0.15))
    assert len(got) == 16


async def test_a_consumer_slower_than_the_idle_timeout_is_no_upstream_silence() -> None:
    got = await _read(_answer([0.0] * 4, idle=0.1), hold=0.3)
    assert len(got) == 4


async def test_silence_after_steady_pieces_ends_idle_in_about_the_idle_timeout() -> None:
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    last = loop.time()
    with pytest.raises(UpstreamError) as caught:
        async for chunk in _answer([0.05] * 8 + [5.0], idle=0.3).chunks():
            got.append(chunk)
            last = loop.time()
    assert caught.value.kind == "idle" and len(got) == 8
    assert 0.25 <= loop.time() - last < 1.0


async def test_max_duration_caps_a_read_however_steady() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamError) as caught:
        await _read(_answer([0.05] * 100, idle=5.0, max_duration=0.4))
    assert caught.value.kind == "timeout" and "max_duration_s" in caught.value.message
    assert 0.35 <= loop.time() - started < 1.5


async def test_a_read_begun_past_the_deadline_ends_at_once() -> None:
    # The consumer held the first piece past the deadline: the next read, which has to
    # wait, is over time at once (not an idle timeout later).
    loop = asyncio.get_running_loop()
    answer = _answer([0.0, 3.0], idle=5.0, max_duration=0.2)
    pieces = answer.chunks()
    assert await anext(pieces) == b"piece 0;"
    await asyncio.sleep(0.4)
    resumed = loop.time()
    with pytest.raises(UpstreamError) as caught:
        await anext(pieces)
    assert caught.value.kind == "timeout"
    assert loop.time() - resumed < 0.5


async def test_an_outer_cancel_is_not_taken_for_a_timeout() -> None:
    task = asyncio.ensure_future(_read(_answer([0.0, 5.0], idle=5.0)))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_an_idle_timeout_leaves_the_tasks_cancel_count_as_it_was() -> None:
    task = asyncio.current_task()
    assert task is not None
    with pytest.raises(UpstreamError) as caught:
        await _read(_answer([0.0, 5.0], idle=0.1))
    assert caught.value.kind == "idle"
    assert task.cancelling() == 0


class _CancelledMeanwhile(httpx.AsyncByteStream):
    """A body that goes quiet, and whose reader is cancelled from outside in the moment the
    idle timeout cancels its read (the client's disconnect meeting the timeout)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"piece 0;"
        try:
            await asyncio.sleep(5.0)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            raise
        yield b"piece 1;"


async def test_an_outer_cancel_meeting_the_idle_timeout_stays_a_cancel() -> None:
    answer = UpstreamResponse(httpx.Response(200, stream=_CancelledMeanwhile()), 0.1)
    task = asyncio.ensure_future(_read(answer))
    with pytest.raises(asyncio.CancelledError):
        await task


class _WithAnEmptyPiece(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"piece 0;"
        yield b""
        yield b"piece 1;"


async def test_an_empty_piece_on_the_way_is_not_the_end_of_the_body() -> None:
    # The end of a body is said as aiohttp's readany says it (b""): a stream from any other
    # transport that yields an empty piece on the way still gives all of its body.
    answer = UpstreamResponse(httpx.Response(200, stream=_WithAnEmptyPiece()), 5.0)
    assert await _read(answer) == [b"piece 0;", b"piece 1;"]
