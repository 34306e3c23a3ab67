"""A probe: ask a slot how it is (its kind's health endpoint, if any, and its model list)
and read the answers into an ``Observation``. No database: what changes is decided in
``dispatch.lifecycle.changes`` and written in ``dispatch.lifecycle.persistence``."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from dispatch import kinds
from dispatch.kinds import Loads
from dispatch.routing import states
from dispatch.routing.table import SlotEntry
from dispatch.upstream.client import upstream

# Not a slot state: what a probe saw when the server is up but too busy to list its models.
BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Observation:
    state: str
    error: str
    advertised: tuple[str, ...] | None  # model ids from /models; None when not read
    timed_out: bool = False  # /models gave no answer in time (as opposed to refusing)
    # model id -> the rest of its /models entry (context_length, capabilities, meta...)
    details: Mapping[str, Mapping[str, Any]] | None = None
    # What the server said of loading its models (None: it says nothing; all it lists is
    # loaded). Read only from a ready server, as the model list is.
    loads: Loads | None = None
    # What asking the server found it speaks (dispatch.lifecycle.discovery), and of what
    # (dispatch.routing.speaks.key); None: not asked this time.
    spoken: Mapping[str, bool] | None = None
    spoken_for: str = ""


async def observe(slot: SlotEntry, timeout: float) -> Observation:
    """Ask the slot how it is: its kind's health endpoint (if any) and ``/models``."""
    kind = kinds.get(slot.kind)
    health_url = kind.health_url(slot)
    limit = int(settings.HAL0_MAX_RESPONSE_MB * 2**20)
    loads_url = kind.loads_url(slot)
    probes = [upstream.probe(kind.models_url(slot), timeout, limit, slot.api_key_env)]
    if health_url:
        probes.append(upstream.probe(health_url, timeout, limit, slot.api_key_env))
    if loads_url:
        probes.append(upstream.probe(loads_url, timeout, limit, slot.api_key_env))
    results = await asyncio.gather(*probes)
    models = results[0]
    health = results[1] if health_url else None
    loaded = results[-1] if loads_url else None
    # A health endpoint the server does not have (404: llama-cpp-python) says nothing.
    h_status = health.status if health is not None and health.status != 404 else None
    if models.status is None and health is not None and health.status == 404:
        # It answered (so it is up) but /models did not: llama-cpp-python serves /v1/models
        # only between generations (it waits for the model lock), so a long generation would
        # otherwise read as "offline" and turn every other request away. Busy: keep the state.
        return Observation(BUSY, models.error, None)
    state = kind.classify(h_status, health.body if health else None, models.status)
    listing = kind.listing(models.body) if models.status == 200 else None
    error = ""
    if state in states.PROBED_DOWN:
        error = (
            models.error or (health.error if health else "") or f"/models answered {models.status}"
        )
    loads = None
    if listing is not None:
        loads = kind.read_loads(
            models.body,
            health.body if health is not None and health.status == 200 else None,
            loaded.body if loaded is not None and loaded.status == 200 else None,
        )
    return Observation(
        state,
        error,
        listing.ids if listing is not None else None,
        timed_out=models.timed_out,
        details=listing.details if listing is not None else None,
        loads=loads,
    )
