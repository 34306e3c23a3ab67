"""Where a slot's URLs are: its API root and its server's root. Pure."""

from __future__ import annotations

from dispatch.routing.table import SlotEntry


def upstream_url(slot: SlotEntry, path: str) -> str:
    return slot.url.rstrip("/") + "/" + path.lstrip("/")


def server_root(slot: SlotEntry) -> str:
    """The server's root: the API root without its trailing ``/v1`` (llama.cpp's /health)."""
    base = slot.url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base
