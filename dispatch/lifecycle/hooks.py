"""What other modules hang on the watcher (metrics, the request log).

Kept apart so the watcher itself stays about slots. Only the process that runs the watcher
(the server with HAL0_WATCHER=true, or `manage.py watch`) runs them, so with several workers
the housekeeping happens once, not once per worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from asgiref.sync import sync_to_async

log = logging.getLogger("hal0.health")

# Called after every probe with (slot, seconds, observed state).
probe_listeners: list[Callable[[str, float, str], None]] = []
# Sync jobs run in a thread when the watcher starts and every HOUSEKEEPING_S after.
housekeeping: list[Callable[[], object]] = []
HOUSEKEEPING_S = 3600.0


def probed(slot: str, seconds: float, state: str) -> None:
    for listener in probe_listeners:
        try:
            listener(slot, seconds, state)
        except Exception:  # a listener's bug must not stop the probe loop
            log.exception("probe listener failed")


async def run_housekeeping() -> None:
    while True:
        for job in housekeeping:
            try:
                await sync_to_async(job, thread_sensitive=True)()
            except Exception:  # the database may be briefly away; the next round tries again
                log.warning("housekeeping job %s failed", job, exc_info=True)
        await asyncio.sleep(HOUSEKEEPING_S)
