"""A fake llama.cpp ``llama-server`` in router mode, from its README ("Using multiple models",
GET /models, POST /models/load, POST /models/unload, GET /props) and server-models.cpp.

Every model it knows is listed with a ``status`` (``unloaded``, ``loading``, ``loaded``; a
failed load: ``unloaded`` with ``failed: true`` and an ``exit_code``), along with ``args``
and ``preset`` as the real one leaks them. ``POST /models/load`` answers ``{"success":
true}`` at once and loads in the background (``load_delay_s``); past ``models_max`` the
router itself unloads its least recently used model (busy or not, as llama.cpp #21678
reports). A completion for an unloaded model loads it first (autoload), as the real router
does. ``GET /props`` says ``role: router`` and ``max_instances``.

It counts what a test wants to know: the loads in order, the most loads at once, the
unloads, and the requests each model served.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fake_wire import Call, Seen, read_request, send_json
from tests.fakes import FakeUpstream

_COMPLETIONS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class FakeRouter(FakeUpstream):
    models_max: int = 1
    load_delay_s: float = 0.3
    fail_loads: dict[str, int] = field(default_factory=dict)  # model -> exit code
    status: dict[str, str] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    used_at: dict[str, float] = field(default_factory=dict)
    load_log: list[str] = field(default_factory=list)
    unload_log: list[str] = field(default_factory=list)
    loading_now: int = 0
    loading_max: int = 0
    served: list[str] = field(default_factory=list)  # model of each completion served
    busy: dict[str, int] = field(default_factory=dict)
    evicted_busy: list[str] = field(default_factory=list)  # its own LRU hit a busy model
    unloaded_busy: list[str] = field(default_factory=list)  # asked to unload a busy model
    load_tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    asked: list[tuple[str, str]] = field(default_factory=list)  # (/models/load|unload, model)
    # > 0: an unloaded model's server takes this long to exit, and a load asked meanwhile
    # past --models-max is refused ("model limit reached"), as the real router does.
    unload_delay_s: float = 0.0
    refused_loads: list[str] = field(default_factory=list)
    listeners: list[asyncio.Queue[dict[str, Any]]] = field(default_factory=list)  # /models/sse

    def __post_init__(self) -> None:
        self.listing = "llama.cpp"
        for m in self.models:
            self.status.setdefault(m, "unloaded")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path == "/models/sse":
            return await self._sse(receive, send)
        if scope["type"] == "http" and path in ("/models/load", "/models/unload", "/props"):
            return await self._router(scope, receive, send, path)
        if scope["type"] == "http" and path in _COMPLETIONS:
            # The base class routes completions to its own method: come here first.
            body = await read_request(scope, receive, send)
            if body is None:
                return
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            self.requests.append(Seen(path, headers, body))
            return await self.completion(Call(scope["method"], path, headers, body, receive, send))
        await super().__call__(scope, receive, send)

    async def _router(self, scope: dict[str, Any], receive: Any, send: Any, path: str) -> None:
        if path == "/props":
            props = {"role": "router", "max_instances": self.models_max}
            return await send_json(send, 200, props)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        model = json.loads(body or b"{}").get("model")
        self.asked.append((path, model))
        if model not in self.status:
            return await send_json(send, 400, {"error": {"message": f"model {model} not found"}})
        if path == "/models/unload":
            if self.status[model] != "loaded":
                return await send_json(send, 400, {"error": {"message": "model is not running"}})
            if self.busy.get(model):
                self.unloaded_busy.append(model)
            self.unload_log.append(model)
            if self.unload_delay_s:
                # The real router answers once it has asked the model's server to stop; the
                # model stays listed (and counted against --models-max) until it exits.
                asyncio.get_running_loop().call_later(self.unload_delay_s, self._gone, model)
            else:
                self._gone(model)
            return await send_json(send, 200, {"success": True})
        if self.status[model] in ("loaded", "loading"):
            return await send_json(send, 400, {"error": {"message": "model is already running"}})
        running = [m for m, s in self.status.items() if s in ("loaded", "loading")]
        if self.unload_delay_s and self.models_max and len(running) >= self.models_max:
            self.refused_loads.append(model)
            message = "model limit reached, try again later"
            return await send_json(send, 500, {"error": {"message": message}})
        self._start_load(model)
        await send_json(send, 200, {"success": True})

    async def _sse(self, receive: Any, send: Any) -> None:
        """``GET /models/sse``: every event from now on, as ``data: {json}`` lines (the router
        names the event inside its JSON), until the client goes away."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.listeners.append(queue)
        await send(
            {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"text/event-stream")]}
        )  # fmt: skip
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                event = asyncio.ensure_future(queue.get())
                await asyncio.wait((event, gone), return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    return
                body = b"data: " + json.dumps(event.result()).encode() + b"\n\n"
                await send({"type": "http.response.body", "body": body, "more_body": True})
        finally:
            gone.cancel()
            self.listeners.remove(queue)

    def _gone(self, model: str) -> None:
        self.status[model] = "unloaded"
        self._push(model, "status_change", {"status": "unloaded"})

    def _push(self, model: str, event: str, data: dict[str, Any]) -> None:
        for queue in self.listeners:
            queue.put_nowait({"model": model, "event": event, "data": data})

    def _start_load(self, model: str) -> asyncio.Task[None]:
        running = [m for m, s in self.status.items() if s in ("loaded", "loading")]
        if self.models_max and len(running) >= self.models_max:
            lru = min(running, key=lambda m: self.used_at.get(m, 0.0))
            if self.busy.get(lru):
                self.evicted_busy.append(lru)
            self.status[lru] = "unloaded"
            self.unload_log.append(lru)
        self.status[model] = "loading"
        self.failed.pop(model, None)
        self.load_log.append(model)
        task = self.load_tasks[model] = asyncio.get_running_loop().create_task(self._load(model))
        return task

    async def _load(self, model: str) -> None:
        self.loading_now += 1
        self.loading_max = max(self.loading_max, self.loading_now)
        self._push(model, "model_status", {"status": "loading"})
        try:
            for step in (1, 2, 3):
                await asyncio.sleep(self.load_delay_s / 4)
                progress = {"stages": ["text_model"], "current": "text_model", "value": step / 4}
                self._push(model, "status_change", {"status": "loading", "progress": progress})
            await asyncio.sleep(self.load_delay_s / 4)
        finally:
            self.loading_now -= 1
        if model in self.fail_loads:
            self.status[model] = "unloaded"
            self.failed[model] = self.fail_loads[model]
            self._push(
                model, "status_change", {"status": "unloaded", "exit_code": self.failed[model]}
            )
        else:
            self.status[model] = "loaded"
            self.used_at[model] = time.monotonic()
            self._push(model, "status_change", {"status": "loaded"})

    def _listed(self, model: str) -> dict[str, Any]:
        entry = super()._listed(model)
        value, failed = self.status[model], self.failed.get(model)
        status: dict[str, Any] = {
            "value": value,
            "args": ["llama-server", "--port", "41234", "-m", f"/srv/models/{model}.gguf"],
            "preset": f"[{model}]\nmodel = /srv/models/{model}.gguf\n",
        }
        if failed is not None:
            status.update(failed=True, exit_code=failed)
        entry["status"] = status
        return entry

    async def completion(self, call: Call) -> None:
        model = json.loads(call.body or b"{}").get("model")
        if model in self.status:
            if self.status[model] == "unloaded":
                self._start_load(model)  # autoload, as the real router does
            if self.status[model] == "loading":
                await self.load_tasks[model]
            if self.status[model] != "loaded":
                return await send_json(
                    call.send, 500, {"error": {"message": f"model {model} failed to load"}}
                )
            self.used_at[model] = time.monotonic()
            self.served.append(model)
        self.busy[model] = self.busy.get(model, 0) + 1
        try:
            await super().completion(call)
        finally:
            self.busy[model] -= 1
            self.used_at[model] = time.monotonic()


async def _disconnected(receive: Any) -> None:
    """Until the client goes away (its request's body, empty for a GET, read on the way)."""
    while (await receive())["type"] != "http.disconnect":
        pass
