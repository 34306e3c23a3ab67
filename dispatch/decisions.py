"""Making each routing decision visible: one structured log line and one live event."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson

from dispatch import events

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
    if log.isEnabledFor(logging.INFO):
        log.info(orjson.dumps(data).decode())
    events.publish({"type": "dispatch.decision", **data})
