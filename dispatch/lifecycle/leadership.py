"""Which process runs the watcher: the one holding the watcher lease, which also beats the
state version's heart so every process can tell fresh state from stale."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from dispatch.coordination import events, leases, outages, sync
from dispatch.lifecycle import loader
from dispatch.lifecycle.watcher import watcher

log = logging.getLogger("hal0.health")


class Leadership:
    """Stand for the watcher lease; while holding it, run the watcher and beat its heart.

    Every process that may watch runs one of these; the lease (``dispatch.coordination.leases``) lets one
    lead. The others ask again every tick, so when the leader dies another leads within a
    probe interval or two. The leader writes when the state of every slot was last known
    (``StateVersion.beat``), which is how every process tells fresh state from stale.
    """

    def __init__(self) -> None:
        self.leading = False
        self._lease: leases.Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._beaten: datetime | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.running and self._task is not None and self._task.get_loop() is loop:
            return
        self.leading, self._beaten = False, None
        self._task = loop.create_task(
            self._run(), name="hal0-leadership", context=contextvars.Context()
        )

    async def stop(self) -> None:
        for task in (self._task, self._listener):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._listener = None
        if self.leading:
            self.leading = False
            await watcher.stop()
            await loader.stop()
        if self._lease is not None:
            await sync_to_async(self._lease.release, thread_sensitive=True)()

    async def _run(self) -> None:
        if self._lease is None:
            self._lease = leases.watcher_lease()
        lease = self._lease
        while True:
            try:
                if not self.leading:
                    if await sync_to_async(lease.try_acquire, thread_sensitive=True)():
                        self.leading = True
                        log.info("this process (%s) leads the watcher", leases.IDENTITY)
                        watcher.start()
                        loader.start()
                        self._listener = asyncio.get_running_loop().create_task(
                            events.listen(events.WATCHER_GROUP, self._heard)
                        )
                elif not await sync_to_async(lease.held, thread_sensitive=True)():
                    log.warning("this process lost the watcher lease; standing by")
                    self.leading = False
                    if self._listener is not None:
                        self._listener.cancel()
                    await watcher.stop()
                    await loader.stop()
                if self.leading:
                    await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be briefly away; the next tick tries again
                if isinstance(exc, outages.DATABASE.errors):
                    outages.DATABASE.failed("checking the watcher lease", exc)  # warns once
                else:
                    log.warning("watcher leadership check failed", exc_info=True)
            await asyncio.sleep(min(settings.HAL0_PROBE_INTERVAL_S, 1.0))

    async def _beat(self) -> None:
        from dispatch.models import StateVersion

        probed_at = watcher.last_round()
        if probed_at is not None and probed_at != self._beaten:
            await sync_to_async(StateVersion.beat, thread_sensitive=True)(
                probed_at, leases.IDENTITY
            )
            self._beaten = probed_at

    def _heard(self, event: dict[str, Any]) -> None:
        if event.get("type") == "poke" and isinstance(event.get("slot"), str):
            watcher.poke(event["slot"])
        else:
            loader.loader.heard(event)  # a request's load demand, its end, a usage report


leadership = Leadership()


def ensure_running() -> None:
    """Stand for the watcher lease on this loop (unless HAL0_WATCHER=false), and in every
    process follow the state version, so changes other processes commit arrive here."""
    if settings.HAL0_WATCHER:
        leadership.start()
    sync.ensure_following()
