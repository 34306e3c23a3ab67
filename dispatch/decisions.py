"""Making each routing decision visible: one structured log line and one live event."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dispatch import events
from dispatch.errors import dumps

log = logging.getLogger("hal0.dispatch")


@dataclass(slots=True)
class DecisionRecord:
    request_id: str
    endpoint: str
    model: str | None
    slot: str | None = None
    upstream_model: str | None = None
    resolution_path: str | None = None
    cache_state: str = "fresh"
    latency_us: float = 0.0
    status: int = 0
    duration_ms: float = 0.0
    error: str | None = None
    inflight: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "event": "dispatch.decision",
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "slot": self.slot,
            "upstream_model": self.upstream_model,
            "resolution_path": self.resolution_path,
            "cache_state": self.cache_state,
            "latency_us": round(self.latency_us, 2),
            "status": self.status,
            "duration_ms": round(self.duration_ms, 2),
            "error": self.error,
            "inflight": self.inflight,
        }


def record(rec: DecisionRecord) -> None:
    """Log the decision and send it to the live UI; neither may delay or fail the request."""
    data = rec.as_dict()
    if rec.model is not None and not rec.model.isascii():
        # A lone surrogate (accepted: bodies.loads) cannot be encoded as UTF-8, which a log
        # line and a channel-layer message both need: keep it as its escape.
        data["model"] = rec.model.encode("utf-8", "backslashreplace").decode()
    if log.isEnabledFor(logging.INFO):
        log.info(dumps(data).decode())
    events.publish({"type": "dispatch.decision", **data})


class InflightReporter:
    """Tells the live UI how busy each slot is, at most every ``interval`` seconds.

    Under load counts change thousands of times a second; the page needs a few updates a
    second, so changes are gathered and sent as one `slot.inflight` event per interval.
    """

    def __init__(self, counts: Mapping[str, int], interval: float = 0.1) -> None:
        self._counts = counts
        self._interval = interval
        self._dirty: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._send: Callable[[dict[str, object]], None] = events.publish

    def note(self, slot: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._dirty.add(slot)  # the next note on a loop sends it
            return
        if self._timer_loop is not loop:
            if self._timer_loop is not None:
                # A timer left on another (stopped) loop never fires, and what it gathered
                # was for the pages that loop served: start afresh on this one.
                self._dirty.clear()
            self._timer, self._timer_loop = None, loop
        self._dirty.add(slot)
        if self._timer is None:
            self._timer = loop.call_later(self._interval, self._flush)

    def _flush(self) -> None:
        self._timer = None
        dirty, self._dirty = self._dirty, set()
        self._send(
            {
                "type": "slot.inflight",
                "inflight": {s: self._counts.get(s, 0) for s in sorted(dirty)},
            }
        )
