"""`manage.py watch`: run the slot watcher on its own, for multi-worker deployments.

Set HAL0_WATCHER=false for the server workers; this process then probes every slot and
writes what it sees to the database, and the workers pick the changes up from there.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from django.core.management.base import BaseCommand

from dispatch.coordination import sync
from dispatch.lifecycle.leadership import leadership


class Command(BaseCommand):
    help = (
        "Probe every enabled slot and keep its state and models up to date, until SIGTERM/SIGINT."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        asyncio.run(self._run())
        self.stdout.write("watcher stopped")

    async def _run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # It stands for the lease like any server process: one watcher probes at a time.
        leadership.start()
        # Other processes (the admin in a server worker, an import) change slots too: follow
        # the state version so new or removed slots are picked up.
        sync.ensure_following()
        self.stdout.write("watching slots (SIGTERM or Ctrl-C stops)")
        self.stdout.flush()
        await stop.wait()
        await sync.stop_following()
        await leadership.stop()
        from dispatch.upstream.client import upstream

        await upstream.aclose()
