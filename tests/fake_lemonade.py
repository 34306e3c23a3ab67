"""A fake Lemonade Server, written from its documentation (docs/api/lemonade.md and
docs/api/openai.md in lemonade-sdk/lemonade) and, where that is silent, its router's code.

Under ``/api/v1`` (and ``/v1``): ``GET health`` (``model_loaded``, ``all_models_loaded``,
``max_models``), ``GET models`` (every model it has downloaded, loaded or not), ``POST load``
and ``POST unload`` (``{"model_name": m}``; each answers once done), and ``POST
chat/completions`` (streamed or not), which loads its model first when it is not in memory.
As the real one: at ``max_loaded_models`` (the ``limit``; -1 in its config, 0 here: none) a
load first unloads the least recently used model, once its requests are done; loads are one
at a time; after a load that fails it unloads every model and tries once more.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tests.fake_loading import EVICT, LoadingServer, openai_chunk, openai_completion, parse_json
from tests.fake_wire import (
    Receive,
    Seen,
    Send,
    end_stream,
    read_request,
    send_json,
    send_part,
    sse,
    start_stream,
)

PREFIXES = ("/api/v1/", "/v1/")
CHECKPOINT = "org/{}:Q4_K_M"


@dataclass
class FakeLemonade(LoadingServer):
    name: str = "lemonade"
    version: str = "9.3.3"

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Seen(scope["path"], headers, body))
        prefix = next((p for p in PREFIXES if scope["path"].startswith(p)), None)
        route = scope["path"][len(prefix) :] if prefix else ""
        answer = {
            ("GET", "health"): self._health,
            ("GET", "models"): self._models,
            ("POST", "load"): self._load_call,
            ("POST", "unload"): self._unload_call,
            ("POST", "chat/completions"): self._chat,
        }.get((scope["method"], route))
        if answer is None:
            return await send_json(send, 404, {"error": f"no route {scope['path']}"})
        await answer(body, send)

    # --- what it says ----------------------------------------------------------------------------

    async def _health(self, body: bytes, send: Send) -> None:
        newest = max(self.loaded, key=self.loaded.__getitem__, default=None)
        limit = self.limit if self.limit > 0 else -1
        await send_json(
            send,
            200,
            {
                "status": "ok",
                "version": self.version,
                "model_loaded": newest,
                "all_models_loaded": [self._loaded_entry(m) for m in self.in_memory()],
                "pinned_models": {"llm": 0, "embedding": 0, "reranking": 0},
                "max_models": {"llm": limit, "embedding": limit, "reranking": limit},
            },
        )

    def _loaded_entry(self, model: str) -> dict[str, Any]:
        return {
            "model_name": model,
            "checkpoint": CHECKPOINT.format(model),
            "last_use": self.loaded[model],
            "type": "llm",
            "device": "cpu",
            "pinned": False,
            "is_busy": self.busy[model] > 0,
            "recipe": "llamacpp",
            "recipe_options": {"ctx_size": 4096},
            "backend_url": "http://127.0.0.1:8001/v1",
        }

    async def _models(self, body: bytes, send: Send) -> None:
        data = [
            {
                "id": m,
                "object": "model",
                "created": 1744173590,
                "owned_by": "lemonade",
                "checkpoint": CHECKPOINT.format(m),
                "recipe": "llamacpp",
                "downloaded": True,
                "suggested": True,
                "labels": [],
            }
            for m in self.models
        ]
        await send_json(send, 200, {"object": "list", "data": data})

    # --- what it does ----------------------------------------------------------------------------

    async def _load_call(self, body: bytes, send: Send) -> None:
        req = parse_json(body)
        model = req.get("model_name") if isinstance(req, dict) else None
        if not isinstance(model, str):
            error = {"message": "Invalid request: model_name is required"}
            return await send_json(send, 400, {"error": error | {"type": "invalid_request_error"}})
        if model not in self.models:
            return await send_json(send, 404, _model_error(model, "model_not_found"))
        reason = await self.ensure_loaded(model)
        if reason is not None:
            return await send_json(send, 500, _model_error(model, "model_load_error", reason))
        answer = {
            "status": "success",
            "model_name": model,
            "checkpoint": CHECKPOINT.format(model),
            "recipe": "llamacpp",
        }
        await send_json(send, 200, answer)

    async def _unload_call(self, body: bytes, send: Send) -> None:
        req = parse_json(body) if body else {}
        model = (req.get("model_name") or req.get("model")) if isinstance(req, dict) else None
        if not model:
            await self.drop_all()
            return await send_json(
                send, 200, {"status": "success", "message": "All models unloaded successfully"}
            )
        if not await self.drop(str(model)):
            return await send_json(send, 404, {"error": f"Model not loaded: {model}"})
        answer = {"status": "success", "message": "Model unloaded successfully"}
        await send_json(send, 200, answer | {"model_name": model})

    async def after_failed_load(self, model: str, reason: str) -> str | None:
        # Lemonade's "nuclear" rule: a load that failed (not for a missing file) unloads
        # every model and is tried once more.
        await self.drop_all(EVICT)
        return await self.retry_load(model)

    async def _chat(self, body: bytes, send: Send) -> None:
        req = parse_json(body)
        model = req.get("model") if isinstance(req, dict) else None
        if not isinstance(model, str) or model not in self.models:
            return await send_json(send, 404, _model_error(str(model), "model_not_found"))
        reason = await self.ensure_loaded(model)  # what the real one does on a request
        if reason is not None:
            return await send_json(send, 500, _model_error(model, "model_load_error", reason))
        async with self.serving(model):
            if self.reply_delay_s:
                await asyncio.sleep(self.reply_delay_s)
            if req.get("stream"):
                return await self._stream(model, send)
            await send_json(send, 200, openai_completion(self.name, model, self.text()))

    async def _stream(self, model: str, send: Send) -> None:
        await start_stream(send, b"text/event-stream", [])
        for i, piece in enumerate(self.pieces()):
            if i and self.chunk_gap_s:
                await asyncio.sleep(self.chunk_gap_s)
            await send_part(send, sse(None, openai_chunk(self.name, model, piece)))
        await end_stream(send, b"data: [DONE]\n\n")


def _model_error(model: str, code: str, reason: str = "") -> dict[str, Any]:
    """Its error body for a model (Server::create_model_error)."""
    if code == "model_not_found":
        message = f"Model '{model}' was not found. Use 'lemonade list' to see all models."
    else:
        message = f"Failed to load model '{model}': {reason}"
    return {
        "error": {
            "message": message,
            "type": code,
            "param": "model",
            "code": code,
            "requested_model": model,
        }
    }
