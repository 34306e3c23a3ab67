"""Any OpenAI-compatible server: ``GET /models`` under its API root says whether it is up
(200: ready; 503: loading) and what it serves. No health endpoint is assumed."""

from __future__ import annotations

from dispatch.kinds.base import Kind


class OpenAICompatible(Kind):
    name = "openai"
    label = "OpenAI-compatible"


KIND = OpenAICompatible()
