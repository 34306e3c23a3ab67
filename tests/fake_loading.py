"""What the fake loading servers (tests/fake_lemonade.py, tests/fake_ollama.py) share: a set
of models on disk, the ones in memory, and the rules a real server loads by.

A load takes ``load_delay_s`` (or the model's own in ``load_delays``) and fails, with the
reason given, for a model named in ``failing``. Loads are one at a time when ``serialize``
(as in Lemonade's router and Ollama's scheduler), and a request for a model being loaded
joins that load. At ``limit`` models in memory (0: no limit), a load first evicts the least
recently used one, waiting for its requests in flight to finish, as both servers do. Every
step is recorded, so a test can tell what the server did and in which order.

All of it runs on the server's event loop (the fake's thread); a test reads the records
from its own thread between steps (tests/polling.py waits for them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tests.fake_wire import Seen

# What `history` records: a load started, ended loaded, ended failed; a model leaving memory
# because it was asked to, because a load needed its room, or because its keep-alive ended;
# a request answered by a model (chat, generate), when its answer ended.
LOAD, LOADED, FAILED = "load", "loaded", "failed"
UNLOAD, EVICT, EXPIRE = "unload", "evict", "expire"
SERVED = "served"


@dataclass
class LoadingServer:
    name: str = "fake"
    models: list[str] = field(default_factory=lambda: ["model-a", "model-b", "model-c"])
    limit: int = 1  # models in memory at once; 0: no limit
    load_delay_s: float = 0.0
    load_delays: dict[str, float] = field(default_factory=dict)  # per model, over the above
    failing: dict[str, str] = field(default_factory=dict)  # model -> why its load fails
    serialize: bool = True  # one load at a time, inside the server
    # A reply: `chunks` pieces (streamed, `chunk_gap_s` apart), after `reply_delay_s`.
    reply: str = ""
    chunks: int = 3
    chunk_gap_s: float = 0.0
    reply_delay_s: float = 0.0

    # --- what it did ---------------------------------------------------------------------------
    requests: list[Seen] = field(default_factory=list)
    loaded: dict[str, float] = field(default_factory=dict)  # in memory -> last use (time.time)
    loading: set[str] = field(default_factory=set)
    busy: Counter[str] = field(default_factory=Counter)  # requests being answered, per model
    history: list[tuple[str, str]] = field(default_factory=list)  # (step, model), in order
    # Requests waiting on a load now, and the most at once: explicit loads and requests that
    # load their model implicitly alike (hal0web's "one load at a time" shows here).
    load_waiters: int = 0
    load_waiters_max: int = 0
    loads_active: int = 0  # loads under way inside the server now
    loads_active_max: int = 0

    def __post_init__(self) -> None:
        self._joinable: dict[str, asyncio.Future[str | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serial = asyncio.Lock()
        self._changed = asyncio.Condition()

    # --- what tests read -------------------------------------------------------------------------

    def steps(self, step: str) -> list[str]:
        """The models of every ``step`` (``LOAD``, ``EVICT``...), in order."""
        return [m for s, m in self.history if s == step]

    @property
    def loads(self) -> list[str]:
        """Every load the server started (a retry counts), in order."""
        return self.steps(LOAD)

    @property
    def unloads(self) -> list[str]:
        """Every model that left memory, whatever the reason, in order."""
        return [m for s, m in self.history if s in (UNLOAD, EVICT, EXPIRE)]

    @property
    def evictions(self) -> list[str]:
        """The models the server unloaded itself to make room for a load."""
        return self.steps(EVICT)

    def in_memory(self) -> list[str]:
        """The loaded models, least recently used first."""
        return sorted(self.loaded, key=self.loaded.__getitem__)

    # --- loading ---------------------------------------------------------------------------------

    async def ensure_loaded(self, model: str) -> str | None:
        """Load ``model`` unless it is in memory, joining a load of it under way; None once it
        is in memory, or why its load failed."""
        self._bind()
        if model in self.loaded:
            self.loaded[model] = time.time()
            return None
        self.load_waiters += 1
        self.load_waiters_max = max(self.load_waiters_max, self.load_waiters)
        try:
            joined = self._joinable.get(model)
            if joined is not None:
                return await asyncio.shield(joined)
            done: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
            self._joinable[model] = done
            try:
                result = await self._load_in_turn(model)
            except BaseException as exc:
                done.set_exception(exc)
                done.exception()  # retrieved: no joiner need be there to see it
                raise
            finally:
                del self._joinable[model]
            done.set_result(result)
            return result
        finally:
            self.load_waiters -= 1

    async def _load_in_turn(self, model: str) -> str | None:
        async with self._serial if self.serialize else contextlib.nullcontext():
            if model in self.loaded:
                return None
            reason = await self._load(model)
            if reason is not None:
                reason = await self.after_failed_load(model, reason)
            return reason

    async def _load(self, model: str) -> str | None:
        self.history.append((LOAD, model))
        await self._make_room()
        self.loading.add(model)
        self.loads_active += 1
        self.loads_active_max = max(self.loads_active_max, self.loads_active)
        try:
            await asyncio.sleep(self.load_delays.get(model, self.load_delay_s))
        finally:
            self.loads_active -= 1
            self.loading.discard(model)
        if model in self.failing:
            self.history.append((FAILED, model))
            await self._notify()
            return self.failing[model]
        self.loaded[model] = time.time()
        self.history.append((LOADED, model))
        await self._notify()
        return None

    async def after_failed_load(self, model: str, reason: str) -> str | None:
        """What the server does after a load failed; by default nothing (the reason stands).
        A subclass may unload and retry, as Lemonade does."""
        return reason

    async def retry_load(self, model: str) -> str | None:
        """One more attempt, for ``after_failed_load`` (its serialization already held)."""
        return await self._load(model)

    async def _make_room(self) -> None:
        while self.limit > 0 and len(self.loaded) + len(self.loading) >= self.limit:
            if not self.loaded:  # only loads under way fill it: wait for one to end
                await self._wait_change()
                continue
            await self.drop(self.in_memory()[0], EVICT)

    # --- unloading -------------------------------------------------------------------------------

    async def drop(self, model: str, why: str = UNLOAD) -> bool:
        """Take ``model`` out of memory once its requests in flight are done; False when it
        was not in memory."""
        self._bind()
        if model not in self.loaded:
            return False
        while self.busy[model] > 0:
            await self._wait_change()
        if self.loaded.pop(model, None) is None:
            return False  # another drop took it meanwhile
        self.history.append((why, model))
        await self._notify()
        return True

    async def drop_all(self, why: str = UNLOAD) -> None:
        for model in self.in_memory():
            await self.drop(model, why)

    # --- serving ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serving(self, model: str, record: bool = True) -> AsyncIterator[None]:
        """Hold ``model`` busy while a request is answered (it is not unloaded meanwhile);
        ``record``: the answer is a ``SERVED`` step of the history once it ends."""
        self._bind()
        self.busy[model] += 1
        self.loaded[model] = time.time()
        try:
            yield
        finally:
            self.busy[model] -= 1
            if model in self.loaded:
                self.loaded[model] = time.time()
            if record:
                self.history.append((SERVED, model))
            await self._notify()

    def text(self) -> str:
        return self.reply or f"hello from {self.name}"

    def pieces(self) -> list[str]:
        return [self.text() if i == 0 else f" {i}" for i in range(self.chunks)]

    # --- the loop's primitives ---------------------------------------------------------------------

    def _bind(self) -> None:
        """Locks belong to one event loop: a fake served again (a new server thread) gets new
        ones."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._serial = asyncio.Lock()
            self._changed = asyncio.Condition()
            self._joinable = {}

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_change(self) -> None:
        async with self._changed:
            await self._changed.wait()


# --- the OpenAI-compatible answers both serve ----------------------------------------------------


def parse_json(body: bytes) -> Any:
    """A request's JSON; None when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def openai_completion(name: str, model: str, text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{name}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def openai_chunk(name: str, model: str, piece: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{name}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
    }
