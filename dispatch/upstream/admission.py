"""Per-slot in-flight counts and the ``max_concurrency`` queue.

All of it runs on the server's one event loop, so a check and the act that follows it
(count < limit → count += 1) happen with no ``await`` between them: nothing can slip in.
That makes the limit hold per process. With several processes a ``gate`` (Redis: see
``dispatch.coordination.redis_places``) makes it hold across all of them: a request that has its local
place then takes a global one too.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol

from dispatch.lib.listeners import Listeners


class Gate(Protocol):
    async def acquire(self, slot: str, limit: int, timeout: float) -> bool: ...
    def release(self, slot: str) -> None: ...
    async def aclose(self) -> None: ...


class Admission:
    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self.inflight: Mapping[str, int] = MappingProxyType(self._inflight)
        self._listeners: Listeners[[str]] = Listeners("admission")
        self.gate: Gate | None = None
        self._gated: dict[str, int] = {}  # places this process holds at the gate, per slot

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(slot)`` whenever the slot's in-flight count changes."""
        self._listeners.add(listener)

    def reset(self) -> None:
        self._inflight.clear()
        self._queues.clear()
        self._gated.clear()
        self.gate = None

    def queued(self, slot: str) -> int:
        """How many requests wait for a place on ``slot`` (read when /metrics is scraped)."""
        queue = self._queues.get(slot)
        return len(queue) if queue else 0

    def try_acquire(self, slot: str, limit: int) -> bool:
        count = self._inflight.get(slot, 0)
        if limit and (count >= limit or self._queues.get(slot)):
            return False
        self._inflight[slot] = count + 1
        self._listeners.notify(slot)
        return True

    async def acquire(self, slot: str, limit: int, timeout: float) -> bool:
        """Take a place on ``slot``; wait up to ``timeout`` when it is full (in FIFO order
        among this process's requests, then at the gate)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not await self._acquire_local(slot, limit, timeout):
            return False
        if not limit or self.gate is None:
            return True
        try:
            placed = await self.gate.acquire(slot, limit, max(0.0, deadline - loop.time()))
        except BaseException:
            self._release_local(slot)
            raise
        if not placed:
            self._release_local(slot)
            return False
        self._gated[slot] = self._gated.get(slot, 0) + 1
        return True

    async def _acquire_local(self, slot: str, limit: int, timeout: float) -> bool:
        if self.try_acquire(slot, limit):
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(slot, deque())
        queue.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True  # release() handed its place to us: the count already includes us
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return True  # handed over in the same instant the wait ran out
            fut.cancel()
            return False
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release_local(slot)  # we were handed a place but will not use it
            fut.cancel()
            raise
        finally:
            if fut in queue:
                queue.remove(fut)
            if not queue:
                self._queues.pop(slot, None)

    def release(self, slot: str) -> None:
        """A request on ``slot`` is done: give back its place here and at the gate."""
        gated = self._gated.get(slot, 0)
        if gated and self.gate is not None:
            if gated > 1:
                self._gated[slot] = gated - 1
            else:
                self._gated.pop(slot, None)
            self.gate.release(slot)
        self._release_local(slot)

    def _release_local(self, slot: str) -> None:
        queue = self._queues.get(slot)
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the place over: the count stays the same
                return
        count = self._inflight.get(slot, 0) - 1
        if count > 0:
            self._inflight[slot] = count
        else:
            self._inflight.pop(slot, None)
        self._listeners.notify(slot)


admission = Admission()
