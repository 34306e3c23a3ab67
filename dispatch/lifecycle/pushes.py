"""Model states a server pushes: llama.cpp's router announces each load, its progress, each
unload and each failure on ``GET /models/sse`` (``Kind.events_url``). The process that runs
the watcher and the loader follows that stream for every ready slot whose server has one and
writes what it says as it happens, so a load's progress and end reach every process without
waiting for a probe. A stream that breaks is followed again, backing off; the probes still
read the whole list each interval, which is what a lost event costs: one probe interval.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

from dispatch import kinds
from dispatch.coordination.store import store
from dispatch.kinds import ModelLoad
from dispatch.lifecycle import persistence
from dispatch.routing import states
from dispatch.upstream.client import upstream

log = logging.getLogger("hal0.loads")

# A load's progress is written at most this often (each write reaches every process).
PROGRESS_EVERY_S = 0.5
BACKOFF_MAX_S = 30.0


class Pushes:
    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._written: dict[tuple[str, str], float] = {}  # when progress was last written

    def follow(self, names: list[str]) -> None:
        """Follow the streams of these slots (ready, loading models, with a stream); stop
        following any other."""
        table = store.table
        wanted = set()
        for name in names:
            slot = table.slots.get(name)
            ready = slot is not None and slot.state == states.READY
            if ready and slot is not None and kinds.get(slot.kind).events_url(slot):
                wanted.add(name)
        for name in list(self.tasks):
            if name not in wanted or self.tasks[name].done():
                self.tasks.pop(name).cancel()
        for name in wanted - self.tasks.keys():
            self.tasks[name] = asyncio.get_running_loop().create_task(
                self._run(name), name=f"hal0-pushes-{name}", context=contextvars.Context()
            )

    def following(self, name: str) -> bool:
        task = self.tasks.get(name)
        return task is not None and not task.done()

    async def stop(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, name: str) -> None:
        backoff = 1.0
        while True:
            slot = store.table.slots.get(name)
            if slot is None:
                return
            kind = kinds.get(slot.kind)
            url = kind.events_url(slot)
            if url is None:
                return
            try:
                async for event, data in upstream.events(url, slot.api_key_env):
                    backoff = 1.0
                    await self._heard(name, event, data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the server restarting, a network blip: follow again
                log.debug("slot %s: its event stream ended (%s)", name, exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _heard(self, name: str, event: str, data: object) -> None:
        from dispatch.lifecycle.watcher import watcher

        slot = store.table.slots.get(name)
        if slot is None:
            return
        kind = kinds.get(slot.kind)
        read = kind.read_event(event, data)
        if read is None:
            if kind.event_rereads(event, data):
                watcher.poke(name)
            return
        model, load = read
        if model in persistence.held.get(name, frozenset()):
            return  # the loader is acting on it: its state is the loader's until done
        if not self._worth_writing(name, model, load):
            return
        await persistence.save_loads(name, {model: load})

    def _worth_writing(self, name: str, model: str, load: ModelLoad) -> bool:
        """Every change of state; a change of progress only now and then."""
        from dispatch.routing.eviction import served

        slot = store.table.slots.get(name)
        entry = served(slot).get(model) if slot is not None else None
        if entry is None:
            return False
        if entry.load != load.state or entry.load_error != load.error:
            return True
        if load.progress == entry.progress:
            return False
        now = time.monotonic()
        if now - self._written.get((name, model), 0.0) < PROGRESS_EVERY_S:
            return False
        self._written[(name, model)] = now
        return True


pushes = Pushes()
