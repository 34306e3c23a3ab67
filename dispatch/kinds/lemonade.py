"""Lemonade Server: OpenAI-compatible under ``/api/v1``, with ``GET /api/v1/health``.

Its health answers 200 with ``{"status": "ok", "model_loaded": <id or null>}``: up, but with
no model loaded it is not ready to answer yet (it loads one on the first request), so it
reads as ``loading``. ``GET /api/v1/models`` lists the models it can serve.
"""

from __future__ import annotations

from dispatch.kinds.base import Kind
from dispatch.kinds.urls import upstream_url
from dispatch.routing import states
from dispatch.routing.table import SlotEntry


class Lemonade(Kind):
    name = "lemonade"
    label = "Lemonade"

    def health_url(self, slot: SlotEntry) -> str | None:
        return upstream_url(slot, "health")  # the API root is .../api/v1

    def classify(
        self, health_status: int | None, health_body: object, models_status: int | None
    ) -> str:
        idle = isinstance(health_body, dict) and not health_body.get("model_loaded")
        if health_status == 200 and idle:
            return states.LOADING
        return super().classify(health_status, health_body, models_status)


KIND = Lemonade()
