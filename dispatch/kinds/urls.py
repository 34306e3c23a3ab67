"""Where a slot's URLs are: its API root and its server's root. Pure."""

from __future__ import annotations

from dispatch.routing.table import SlotEntry


def upstream_url(slot: SlotEntry, path: str) -> str:
    """Where ``path`` is on the slot's server: below its API root, or from its server's root
    when ``path`` begins with ``/`` (llama.cpp's ``/tokenize``, Ollama's ``/api/chat``)."""
    if path.startswith("/"):
        return server_root(slot) + path
    return slot.url.rstrip("/") + "/" + path


def server_root(slot: SlotEntry) -> str:
    """The server's root: the API root without its trailing ``/v1`` (llama.cpp's /health)."""
    base = slot.url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base
