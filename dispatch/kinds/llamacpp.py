"""llama.cpp's ``llama-server`` (and llama-cpp-python's server, which answers to the same kind).

``GET /health`` at the server's root (not under ``/v1``) answers 503 ``{"error": {"message":
"Loading model"}}`` while the model loads and 200 once it is ready; ``GET /v1/models`` lists
the model (under its ``--alias``). In router mode (``--models-dir``/``--models-preset``, no
model of its own) ``/health`` answers 200 at once, and ``/v1/models`` (like ``/models``) lists
every model it can load, each with its ``status`` (``unloaded``, ``loading``, ``loaded``,
``sleeping``; ``failed`` with an ``exit_code`` after an instance died); a request loads its
model on demand. llama-cpp-python has no ``/health`` (404), and serves ``/v1/models`` only
between generations: the probe (``dispatch.lifecycle.probe``) reads a 404 there as "no health
endpoint", and a 404 with no ``/models`` answer as "busy".
"""

from __future__ import annotations

from dispatch.kinds.base import Kind
from dispatch.kinds.urls import server_root
from dispatch.routing.table import SlotEntry


class LlamaCpp(Kind):
    name = "llamacpp"
    label = "llama.cpp"

    def health_url(self, slot: SlotEntry) -> str | None:
        return server_root(slot) + "/health"


KIND = LlamaCpp()
