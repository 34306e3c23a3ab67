"""Per-slot in-flight counts and the ``max_concurrency`` queue.

All of it runs on the server's one event loop, so a check and the act that follows it
(count < limit → count += 1) happen with no ``await`` between them: nothing can slip in.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType


class Admission:
    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}
        self.inflight: Mapping[str, int] = MappingProxyType(self._inflight)
        self._listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(slot)`` whenever the slot's in-flight count changes."""
        self._listeners.append(listener)

    def _changed(self, slot: str) -> None:
        for listener in self._listeners:
            listener(slot)

    def reset(self) -> None:
        self._inflight.clear()
        self._queues.clear()

    def queued(self, slot: str) -> int:
        """How many requests wait for a place on ``slot`` (read when /metrics is scraped)."""
        queue = self._queues.get(slot)
        return len(queue) if queue else 0

    def try_acquire(self, slot: str, limit: int) -> bool:
        count = self._inflight.get(slot, 0)
        if limit and (count >= limit or self._queues.get(slot)):
            return False
        self._inflight[slot] = count + 1
        self._changed(slot)
        return True

    async def acquire(self, slot: str, limit: int, timeout: float) -> bool:
        """Take a place on ``slot``; wait in FIFO order up to ``timeout`` when it is full."""
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
                self.release(slot)  # we were handed a place but will not use it
            fut.cancel()
            raise
        finally:
            if fut in queue:
                queue.remove(fut)
            if not queue:
                self._queues.pop(slot, None)

    def release(self, slot: str) -> None:
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
        self._changed(slot)


admission = Admission()
