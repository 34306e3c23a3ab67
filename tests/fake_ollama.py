"""A fake Ollama, written from its API documentation (docs/api.md and docs/openai.md in
ollama/ollama).

At its root: ``GET /api/version``, ``GET /api/tags`` (the models it has), ``GET /api/ps`` (the
ones in memory, with ``expires_at``) and ``POST /api/generate``: with no prompt it loads the
model and answers once it is in memory; with ``"keep_alive": 0`` too, it answers ``"done_reason":
"unload"`` at once and unloads the model just after (once its requests are done); with a
prompt, it generates (NDJSON lines, or one object with ``"stream": false``). ``POST /api/chat``
alike, with ``messages`` (none: a load, or with ``keep_alive`` 0 an unload, ``done_reason``
saying which); ``POST /api/embed`` (``input``: a text or a list) and the older
``/api/embeddings`` (``prompt``). Under ``/v1``:
``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed or not), in OpenAI's shapes.

As the real one: a request for a model not in memory loads it first; at
``OLLAMA_MAX_LOADED_MODELS`` (``limit``) a load first unloads the least recently used model,
once its requests are done; loads are one at a time; a model stays ``keep_alive`` after its
last request (the request's own ``keep_alive``, or ``default_keep_alive_s``; negative:
forever). Here a model whose keep-alive has ended leaves memory when the server next answers
anything (the real one has a timer; a client sees the same).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tests.fake_loading import (
    EXPIRE,
    LoadingServer,
    openai_chunk,
    openai_completion,
    parse_json,
)
from tests.fake_wire import (
    Receive,
    Seen,
    Send,
    end_stream,
    read_request,
    send_bytes,
    send_json,
    send_part,
    sse,
    start_stream,
)

DIGEST = "a2af6cc3eb7fa8be8504abaf9b04e88f17a119ec3f04a3addf55f92841195f5a"
_DURATION = re.compile(r"^(-?\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class FakeOllama(LoadingServer):
    name: str = "ollama"
    models: list[str] = field(default_factory=lambda: ["llama3.2:1b", "gemma3:latest"])
    limit: int = 3  # OLLAMA_MAX_LOADED_MODELS (3 on a CPU)
    default_keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE; negative: forever
    version: str = "0.12.3"
    # When each model in memory leaves it (time.time); None: never.
    expires: dict[str, float | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Seen(scope["path"], headers, body))
        await self._expire()
        answer = {
            ("GET", "/api/version"): self._version,
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/generate"): self._generate,
            ("POST", "/api/chat"): self._api_chat,
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/embeddings"): self._embed,
            ("GET", "/v1/models"): self._openai_models,
            ("POST", "/v1/chat/completions"): self._chat,
        }.get((scope["method"], scope["path"]))
        if answer is None:
            return await send_bytes(send, 404, b"404 page not found", b"text/plain")
        await answer(body, send)

    # --- what it says ----------------------------------------------------------------------------

    async def _version(self, body: bytes, send: Send) -> None:
        await send_json(send, 200, {"version": self.version})

    def _model(self, model: str) -> dict[str, Any]:
        return {
            "name": model,
            "model": model,
            "size": 1321098329,
            "digest": DIGEST,
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": model.split(":")[0],
                "families": [model.split(":")[0]],
                "parameter_size": "1.2B",
                "quantization_level": "Q4_K_M",
            },
        }

    async def _tags(self, body: bytes, send: Send) -> None:
        modified = "2025-05-04T17:37:44.706015396-07:00"
        models = [self._model(m) | {"modified_at": modified} for m in self.models]
        await send_json(send, 200, {"models": models})

    async def _ps(self, body: bytes, send: Send) -> None:
        running = [
            self._model(m)
            | {
                "expires_at": _iso(self.expires.get(m)),
                "size_vram": 0,
                "context_length": 4096,
            }
            for m in reversed(self.in_memory())  # most recently used first
        ]
        await send_json(send, 200, {"models": running})

    async def _openai_models(self, body: bytes, send: Send) -> None:
        data = [
            {"id": m, "object": "model", "created": 1718000000, "owned_by": "library"}
            for m in self.models
        ]
        await send_json(send, 200, {"object": "list", "data": data})

    # --- what it does ----------------------------------------------------------------------------

    async def _generate(self, body: bytes, send: Send) -> None:
        req = parse_json(body)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return await send_json(send, 400, {"error": "model is required"})
        model = req["model"]
        if model not in self.models:
            return await send_json(send, 404, {"error": f"model '{model}' not found"})
        keep_alive = _keep_alive(req.get("keep_alive"), self.default_keep_alive_s)
        if not req.get("prompt") and keep_alive == 0:
            self._later(self._unload(model))
            return await send_json(send, 200, _generated(model, "", "unload"))
        reason = await self.ensure_loaded(model)
        if reason is not None:
            return await send_json(send, 500, {"error": reason})
        if not req.get("prompt"):  # a load: nothing answered by the model
            async with self._serving(model, keep_alive, record=False):
                return await send_json(send, 200, _generated(model, "", None))
        async with self._serving(model, keep_alive):
            if self.reply_delay_s:
                await asyncio.sleep(self.reply_delay_s)
            if req.get("stream", True) is False:
                return await send_json(send, 200, _generated(model, self.text(), "stop"))
            await start_stream(send, b"application/x-ndjson", [])
            for i, piece in enumerate(self.pieces()):
                if i and self.chunk_gap_s:
                    await asyncio.sleep(self.chunk_gap_s)
                await send_part(send, _line({**_generated(model, piece, None), "done": False}))
            await end_stream(send, _line(_generated(model, "", "stop")))

    async def _api_chat(self, body: bytes, send: Send) -> None:
        req = parse_json(body)
        if not isinstance(req, dict) or not isinstance(req.get("model"), str):
            return await send_json(send, 400, {"error": "model is required"})
        model = req["model"]
        if not isinstance(req.get("messages", []), list):  # Go's JSON decoder says it so
            said = "json: cannot unmarshal string into Go struct field ChatRequest.messages"
            return await send_json(send, 400, {"error": f"{said} of type []api.Message"})
        if model not in self.models:
            return await send_json(send, 404, {"error": f"model '{model}' not found"})
        keep_alive = _keep_alive(req.get("keep_alive"), self.default_keep_alive_s)
        if not req.get("messages"):
            if keep_alive == 0:
                self._later(self._unload(model))
                return await send_json(send, 200, _chatted(model, "", "unload"))
            reason = await self.ensure_loaded(model)
            if reason is not None:
                return await send_json(send, 500, {"error": reason})
            async with self._serving(model, keep_alive, record=False):
                return await send_json(send, 200, _chatted(model, "", "load"))
        reason = await self.ensure_loaded(model)
        if reason is not None:
            return await send_json(send, 500, {"error": reason})
        async with self._serving(model, keep_alive):
            if req.get("stream", True) is False:
                return await send_json(send, 200, _counted(_chatted(model, self.text(), "stop")))
            await start_stream(send, b"application/x-ndjson", [])
            for piece in self.pieces():
                await send_part(send, _line({**_chatted(model, piece, None), "done": False}))
            await end_stream(send, _line(_counted(_chatted(model, "", "stop"))))

    async def _embed(self, body: bytes, send: Send) -> None:
        req = parse_json(body)
        model = req.get("model") if isinstance(req, dict) else None
        if not isinstance(model, str) or model not in self.models:
            return await send_json(send, 404, {"error": f"model '{model}' not found"})
        reason = await self.ensure_loaded(model)
        if reason is not None:
            return await send_json(send, 500, {"error": reason})
        if "prompt" in req:  # /api/embeddings, the older one
            return await send_json(send, 200, {"embedding": [0.5, float(len(req["prompt"]))]})
        given = req.get("input")
        texts = given if isinstance(given, list) else [given]
        vectors = [[0.5, float(len(str(t)))] for t in texts]
        answer = {"model": model, "embeddings": vectors, "prompt_eval_count": len(texts)}
        await send_json(send, 200, answer)

    async def _chat(self, body: bytes, send: Send) -> None:
        req = parse_json(body)
        model = req.get("model") if isinstance(req, dict) else None
        if not isinstance(model, str) or model not in self.models:
            message = f'model "{model}" not found, try pulling it first'
            return await send_json(send, 404, _openai_error(message, "not_found_error"))
        reason = await self.ensure_loaded(model)  # what the real one does on a request
        if reason is not None:
            return await send_json(send, 500, _openai_error(reason, "api_error"))
        keep_alive = _keep_alive(req.get("keep_alive"), self.default_keep_alive_s)
        async with self._serving(model, keep_alive):
            if self.reply_delay_s:
                await asyncio.sleep(self.reply_delay_s)
            if not req.get("stream"):
                reply = openai_completion(self.name, model, self.text())
                return await send_json(send, 200, reply)
            await start_stream(send, b"text/event-stream", [])
            for i, piece in enumerate(self.pieces()):
                if i and self.chunk_gap_s:
                    await asyncio.sleep(self.chunk_gap_s)
                await send_part(send, sse(None, openai_chunk(self.name, model, piece)))
            await end_stream(send, b"data: [DONE]\n\n")

    # --- keep-alive ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _serving(
        self, model: str, keep_alive: float | None, record: bool = True
    ) -> AsyncIterator[None]:
        """Serve ``model``; this request's keep-alive starts once the model is idle again."""
        self.expires[model] = None  # in use: it does not expire
        try:
            async with self.serving(model, record):
                yield
        finally:
            if model in self.loaded and self.busy[model] == 0:
                self.expires[model] = None if keep_alive is None else time.time() + keep_alive

    async def _expire(self) -> None:
        now = time.time()
        for model in self.in_memory():
            deadline = self.expires.get(model)
            if deadline is not None and deadline <= now and self.busy[model] == 0:
                await self.drop(model, EXPIRE)

    async def _unload(self, model: str) -> None:
        await self.drop(model)
        self.expires.pop(model, None)

    def _later(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _keep_alive(value: object, default_s: float) -> float | None:
    """Seconds a model stays after a request; None: forever. Ollama takes a number of seconds
    or a duration ("5m", "30s", "1h"); negative: forever."""
    seconds = default_s
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value.strip())):
        seconds = float(m.group(1)) * _UNIT_S[m.group(2) or "s"]
    return None if seconds < 0 else seconds


def _iso(deadline: float | None) -> str:
    when = (
        datetime(2318, 1, 1, tzinfo=UTC)
        if deadline is None
        else datetime.fromtimestamp(deadline, UTC)
    )
    return when.isoformat()


def _generated(model: str, text: str, done_reason: str | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "model": model,
        "created_at": datetime.now(UTC).isoformat(),
        "response": text,
        "done": True,
    }
    if done_reason is not None:
        answer["done_reason"] = done_reason
    return answer


def _chatted(model: str, text: str, done_reason: str | None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "model": model,
        "created_at": datetime.now(UTC).isoformat(),
        "message": {"role": "assistant", "content": text},
        "done": True,
    }
    if done_reason is not None:
        answer["done_reason"] = done_reason
    return answer


def _counted(answer: dict[str, Any]) -> dict[str, Any]:
    """The last object's counts and durations (nanoseconds), as Ollama's."""
    counts = {"prompt_eval_count": 11, "eval_count": 3, "total_duration": 5_000_000}
    return {**answer, **counts, "prompt_eval_duration": 1_000_000, "eval_duration": 3_000_000}


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


def _openai_error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
