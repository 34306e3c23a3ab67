"""An upstream's answer as callers see it (``UpstreamResponse``), and ``UpstreamError``.

The body is read with the slot's timeouts and, when buffered, under a cap that holds while
decoding (``BoundedBody``).
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from functools import partial
from typing import cast

import httpx

from dispatch.upstream.headers import for_downstream
from dispatch.upstream.pool import AiohttpStream, describe

# Encodings a buffered answer is decoded from (under a cap) to be checked and read; any other
# passes through as it came, with its Content-Encoding.
_DECODED = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class UpstreamError(Exception):
    """A transport failure talking to a slot.

    ``kind`` is one of: ``unreachable`` (refused, DNS, reset before any response),
    ``timeout`` (no response headers in time, or no connection in time), ``idle`` (a stream
    went quiet for longer than the slot's idle timeout), ``broken`` (the connection failed
    mid-body).

    ``connected`` is False when the server refused the connection (or its host has no
    address): it is down or not there, which its probe finds at once too, so that is the
    watcher's to tell, not a sign of a slot whose requests fail while its probes pass
    (``dispatch.upstream.outliers``). A connect timeout is not that sure: while requests are
    under way the watcher takes a probe that times out for a busy server, not a dead one.
    """

    def __init__(self, kind: str, message: str, connected: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.connected = connected


class UpstreamResponse:
    """An upstream's answer, headers in; its body read with the slot's timeouts.

    ``idle_timeout_s`` is the longest silence allowed between two pieces of the body,
    streaming or not: a slow but steady answer is not a dead one. ``deadline`` (loop time,
    from the slot's ``max_duration_s``) caps the whole request when set.

    A body the upstream compressed (though asked for identity) streams through as it is,
    with its Content-Encoding; ``read`` decodes gzip and deflate under its cap and then
    drops that header.
    """

    def __init__(
        self,
        response: httpx.Response,
        idle_timeout_s: float,
        deadline: float | None = None,
        max_duration_s: float = 0.0,
        timer: Timer | None = None,
    ) -> None:
        self._response = response
        # The request's own timer (``Upstream.open`` timed the header wait with it), else one
        # made here: an answer built apart from a request (tests) is timed all the same.
        self._timer = timer if timer is not None else Timer(asyncio.get_running_loop())
        self._idle = idle_timeout_s
        self._deadline = deadline
        self._max_duration = max_duration_s
        self.status_code = response.status_code
        # Decoded once, (lower-case name, value): httpx's Headers decode every header again
        # on each look-up, after a property call to find their common encoding.
        self._headers = response.headers.multi_items()
        self.encoding = (self.header("content-encoding") or "").strip().lower()
        if self.encoding == "identity":
            self.encoding = ""
        self.content_type = self.header("content-type") or ""
        # What ``peek`` read of the body, still to be given by ``chunks``; and the upstream's
        # body as it comes, read by one iterator (``peek`` and ``chunks`` share it).
        self._head: list[bytes] = []
        self._raw: AsyncIterator[bytes] | None = None
        self._given = False  # an in-memory body (tests' MockTransport) was given

    @property
    def is_event_stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def header(self, name: str) -> str | None:
        """The header's value (its values joined by commas, as httpx joins them)."""
        name = name.lower()
        values = [value for key, value in self._headers if key == name]
        return ", ".join(values) if values else None

    def headers(self) -> Iterable[tuple[str, str]]:
        for name, value in self._headers:
            if not for_downstream(name):
                continue
            if name == "content-encoding" and not self.encoding:
                continue  # decoded by read(), or identity
            yield name, value

    async def read(self, limit: int) -> bytes:
        """The whole body, decoded from gzip or deflate, at most ``limit`` bytes of it
        (else ``UpstreamError("too_large")``); each piece within the idle timeout.

        The cap holds while decoding, piece by piece: a 10 KB gzip bomb never becomes 10 MB
        in memory on the way to being refused.
        """
        body = BoundedBody(self.encoding, limit)
        try:
            if not self._take_ready(body):  # the rest has yet to come
                async for chunk in self.chunks():
                    body.add(chunk)
        finally:
            await self.aclose()
        if body.decoded:
            self.encoding = ""
        return body.value()

    def _take_ready(self, body: BoundedBody) -> bool:
        """Add to ``body`` what has come of it already: whether that is all of it.

        No clock for that (``chunks`` starts one for reads that wait): there is no time to
        keep for a read that does not wait. A whole answer that came with its headers, as
        most that do not stream do, is read with no timer set at all.
        """
        stream = self._response.stream
        if self._head or not isinstance(stream, AiohttpStream):
            return False
        try:
            while (chunk := stream.ready()) is not None:
                if not chunk:
                    return True
                body.add(chunk)
        except httpx.TransportError as exc:
            raise UpstreamError("broken", f"upstream connection failed: {describe(exc)}") from exc
        return False

    async def read_prefix(self, limit: int) -> bytes:
        """At most ``limit`` bytes of the body (an error page, to quote), then close: an
        upstream's error answer cannot make us hold megabytes."""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in self.chunks():
                parts.append(chunk)
                size += len(chunk)
                if size >= limit:
                    break
        except UpstreamError:
            pass  # what arrived before the failure is all there is to quote
        finally:
            await self.aclose()
        return b"".join(parts)[:limit]

    async def peek(self, limit: int) -> bytes:
        """The body's first bytes (up to ``limit``, or the whole body when it is shorter), as
        it came (not decoded), without taking them: ``chunks`` (and so ``read`` and the
        relay) still gives the whole body. For a look at an error answer before deciding
        what it means."""
        head, self._head = self._head, []
        size = sum(map(len, head))
        pieces = cast(AsyncGenerator[bytes, None], self.chunks())  # the pieces not read yet
        try:
            while size < limit:
                chunk = await anext(pieces, None)
                if chunk is None:
                    break
                head.append(chunk)
                size += len(chunk)
        except UpstreamError:
            pass  # what arrived is what there is to look at; reading on fails again
        finally:
            await pieces.aclose()  # the body's own iterator stays, for chunks() to go on
            self._head = head
        return b"".join(head)[:limit]

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as the upstream sends it: no re-chunking, no buffering."""
        while self._head:  # what peek() read first
            yield self._head.pop(0)
        if self._raw is None:
            if self._response.is_stream_consumed:
                # Built in memory with its body already read (httpx.MockTransport at the seam).
                if self._response.content and not self._given:
                    self._given = True
                    yield self._response.content
                return
            # The transport's stream itself, not ``aiter_raw()``: that wraps every chunk in
            # httpx's bookkeeping (a chunker, a byte count, a request context) that a relay
            # passing bytes on as they come has no use for. ``aclose`` still closes it.
            self._raw = aiter(cast(httpx.AsyncByteStream, self._response.stream))
        stream = self._response.stream
        # Ours read with one await a piece: aiohttp's readany itself, not its __anext__
        # around it (~1,700 instructions a piece of a stream, bench/served.py's stream32).
        read = stream.read if isinstance(stream, AiohttpStream) else partial(_piece, self._raw)
        timer = self._timer
        loop = timer.loop
        # Past the deadline every read is timed by it at once (the clock's tick may be far).
        cap = self._deadline if self._deadline is not None else math.inf
        try:
            timer.begin()
            clock = _ReadClock(loop, timer, self._idle, self._deadline)
            try:
                while True:
                    clock.since = now = loop.time()
                    if now >= cap:
                        clock.arm(now)
                    chunk = await read()
                    if not chunk:  # the end of the body
                        return
                    clock.since = None
                    if clock.armed:  # the piece came in before the time set for it
                        clock.lift()
                    yield chunk
            finally:
                clock.stop()
                timed_out = timer.end()
        except asyncio.CancelledError as exc:
            if not timed_out:
                raise  # a cancel from outside (the client went away): not the clock's
            if clock.capped:
                raise UpstreamError("timeout", self.over_time()) from exc
            raise UpstreamError(
                "idle", f"upstream sent nothing for {self._idle:g}s (idle_timeout_s)"
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamError("broken", f"upstream connection failed: {describe(exc)}") from exc
        except AiohttpStream.FAILURES as exc:  # from ``read``: told as httpx tells it
            told = cast(AiohttpStream, stream).failed(exc)
            raise UpstreamError("broken", f"upstream connection failed: {describe(told)}") from told

    def over_time(self) -> str:
        return f"the request ran past the slot's max_duration_s of {self._max_duration:g}s"

    async def aclose(self) -> None:
        # The transport's stream closed directly, as ``chunks`` reads it: httpx's
        # ``Response.aclose`` wraps this in a context manager that names the request in a
        # failure's exception, and the response has no request to name (Upstream._send).
        response = self._response
        if not response.is_closed:
            response.is_closed = True
            await cast(httpx.AsyncByteStream, response.stream).aclose()


async def _piece(raw: AsyncIterator[bytes]) -> bytes:
    """The next piece of a body from any transport's stream, b"" at its end (as aiohttp's
    readany says it; an empty piece on the way is no piece)."""
    async for chunk in raw:
        if chunk:
            return chunk
    return b""


class Timer:
    """What ``asyncio.timeout`` does for a wait, for one request's waits (its response headers,
    then each read of its body), at a fraction of the cost.

    ``asyncio.timeout`` (a factory, an object with a state, two coroutines for ``async with``,
    a reschedule), once for the header wait and once for the body, cost a request ~28,000
    instructions more than this does. This is a plain ``loop.call_at`` that cancels the
    waiting task, kept by the same rules for telling its cancel from anyone else's (CPython's
    Lib/asyncio/timeouts.py): ``begin`` counts the task's cancel requests; when the time set
    is up the task is cancelled; ``end`` withdraws that request (``Task.uncancel``), and a
    CancelledError is the timer's only when no other request came meanwhile. The client's
    disconnect cancels the request's task: that stays a cancel, even when it meets a timeout.
    """

    __slots__ = ("_cancelling", "_handle", "_task", "expired", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._handle: asyncio.Handle | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self.expired = False  # its time came while the wait under way went on

    def begin(self) -> None:
        """A wait begins in the current task: the one the timer cancels."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Timer times a wait in a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.expired = False

    def set(self, when: float) -> None:
        """Cancel the wait at loop time ``when`` (at once when that is past)."""
        if self._handle is not None:
            self._handle.cancel()
        if when <= self.loop.time():
            self._handle = self.loop.call_soon(self._expire)
        else:
            self._handle = self.loop.call_at(when, self._expire)

    def lift(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def end(self) -> bool:
        """The wait is over: the timer lifted, and whether a CancelledError it ended with is
        the timer's (its time came, and nobody else cancelled the task meanwhile)."""
        self.lift()
        if not self.expired:
            return False
        self.expired = False
        assert self._task is not None
        return self._task.uncancel() <= self._cancelling

    def _expire(self) -> None:
        self._handle = None
        self.expired = True
        assert self._task is not None
        self._task.cancel()


class _ReadClock:
    """The idle timeout and the deadline of one body's read, looked at now and then rather
    than set and lifted around every read.

    ``timer`` (``Timer``), begun for the whole read and not set by itself, does the
    cancelling. Setting it before each read and lifting it after made and dropped a
    timer per piece (~11,000 instructions: a tenth of a 32-event stream's whole cost; a
    fresh ``asyncio.timeout`` per piece, ~27,000). Instead the reader notes when its read
    began (``since``), and this clock ticks at most every ``idle`` seconds (and at the
    deadline): a read it finds waiting gets ``timer`` set for the end of its time, which is
    never past (a read that began after the last tick ends after the next). The reader lifts
    it when its piece comes in first. So ``timer`` is only ever set while a read waits,
    never while a piece is passed on (a slow client's time is not the upstream's silence).
    """

    __slots__ = ("_deadline", "_handle", "_idle", "_loop", "_timer", "armed", "capped", "since")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timer: Timer,
        idle: float,
        deadline: float | None,
    ) -> None:
        self._loop, self._timer, self._idle, self._deadline = loop, timer, idle, deadline
        self.since: float | None = None  # when the read under way began (None: none is)
        self.armed = False  # ``timer`` is set for the read under way
        self.capped = False  # ... for the deadline (max_duration_s), not the idle timeout
        self._handle = loop.call_at(self._next(loop.time()), self._tick)

    def _next(self, now: float) -> float:
        at = now + self._idle
        if self._deadline is not None and now < self._deadline < at:
            return self._deadline
        return at

    def _tick(self) -> None:
        now = self._loop.time()
        if self.since is not None and not self.armed:
            self.arm(self.since)
        self._handle = self._loop.call_at(self._next(now), self._tick)

    def arm(self, since: float) -> None:
        """Set ``timer`` for the read that began at ``since`` (at once if its time is up)."""
        until = since + self._idle
        deadline = self._deadline
        self.capped = deadline is not None and deadline <= until
        self._timer.set(deadline if deadline is not None and self.capped else until)
        self.armed = True

    def lift(self) -> None:
        self._timer.lift()
        self.armed = False

    def stop(self) -> None:
        self._handle.cancel()


class BoundedBody:
    """A body gathered up to a cap, decoded from gzip or deflate on the way."""

    def __init__(self, encoding: str, limit: int) -> None:
        self.limit = limit
        wbits = _DECODED.get(encoding)
        self._inflate = zlib.decompressobj(wbits) if wbits is not None else None
        self.decoded = self._inflate is not None
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        if self._inflate is not None:
            try:
                # One byte past the room left is enough to know the cap is passed.
                chunk = self._inflate.decompress(chunk, self.limit - self._size + 1)
            except zlib.error as exc:
                raise UpstreamError(
                    "broken", f"the upstream's compressed body is bad: {exc}"
                ) from exc
        self._size += len(chunk)
        if self._size > self.limit:
            raise UpstreamError(
                "too_large", f"the upstream's answer is larger than {self.limit / 2**20:g} MB"
            )
        self._parts.append(chunk)

    def value(self) -> bytes:
        return b"".join(self._parts)
