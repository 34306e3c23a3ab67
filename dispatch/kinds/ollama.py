"""Ollama: OpenAI-compatible under ``/v1`` (``GET /v1/models``), with its own API beside it
at the server's root: ``GET /api/version`` (up), ``GET /api/tags`` (the models it has) and
``GET /api/ps`` (the ones loaded now).

Probed as any OpenAI-compatible server: ``/v1/models`` answers as soon as it is up, which is
all hal0web reads today. ``/api/ps`` is where the lifecycle will read which models are loaded.
"""

from __future__ import annotations

from dispatch.kinds.base import Kind


class Ollama(Kind):
    name = "ollama"
    label = "Ollama"


KIND = Ollama()
