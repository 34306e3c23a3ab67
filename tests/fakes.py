"""The fake upstream: one OpenAI-compatible model server, served over real loopback sockets.

It answers every endpoint hal0web forwards, each as its documentation describes it: chat and
text completions and embeddings (here), the Responses API (tests/fake_responses.py),
Anthropic Messages, audio, images and rerank (tests/fake_endpoints.py). Each answer is tagged
with the server's own name, so a test can tell which server answered. Its health can be
switched (ready, loading, error), its answers slowed, failed or cut, and it records what it
received and when a client went away mid-stream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn

from tests import fake_endpoints, fake_responses
from tests.fake_wire import (
    Call,
    Headers,
    Receive,
    Seen,
    Send,
    end_stream,
    read_request,
    send_json,
    send_part,
    start_stream,
)
from tests.polling import wait_until

__all__ = ["FakeUpstream", "Seen", "ServerThread", "free_port"]

Endpoint = Callable[["FakeUpstream", Call], Awaitable[None]]
# What the watcher asks: health, the model list, and llama.cpp's /props (its router's limit).
PROBES = ("/health", "/v1/models", "/props")
# A path it has no route for, answered as FastAPI (llama-cpp-python's server) answers it.
NO_ROUTE = {"detail": "Not Found"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FakeUpstream:
    """An ASGI app that behaves like a small llama.cpp / OpenAI server."""

    name: str
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    # How /v1/models lists them: OpenAI's bare fields (owned by the server's name), or
    # llama.cpp's, with its context length, capabilities and a `created` that moves.
    listing: Literal["openai", "llama.cpp"] = "openai"
    health: str = "ready"  # ready | loading | error
    chunks: int = 3
    chunk_gap_s: float = 0.0
    reply: str = ""
    fail_status: int | None = None  # answer every request but the probes with this status
    delay_headers_s: float = 0.0
    models_delay_s: float = 0.0  # a slow /v1/models (a loaded server)
    break_after_chunks: int | None = None  # drop the connection mid-stream
    set_cookie: str = ""  # a Set-Cookie header on every completion answer
    stream_usage: bool = False  # end a stream with a usage-only chunk, as OpenAI's API can
    # SSE comment lines sent before a stream's first chunk, `comment_gap_s` apart: what a
    # router in front says while a request waits (hal0web's ": hal0 queued position=2 ...").
    stream_comments: list[str] = field(default_factory=list)
    comment_gap_s: float = 0.0
    # Paths it has no route for (say "/v1/messages" and "/v1/responses": llama-cpp-python's
    # server): answered 404 as FastAPI answers a missing route, as any path it never serves.
    missing: set[str] = field(default_factory=set)
    requests: list[Seen] = field(default_factory=list)
    # hal0web's questions whether it speaks an endpoint (`x-hal0-probe: endpoints`), kept
    # apart from `requests`: no client asked them, and tests count what clients asked.
    questions: list[Seen] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    active: int = 0
    models_active: int = 0  # /v1/models requests being answered now
    models_active_max: int = 0
    # The Responses API is stateful: the responses this server made, by id, and their input.
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def tag(self) -> Headers:
        return [(b"x-upstream-slot", self.name.encode())]

    def seen(self, path: str) -> list[Seen]:
        return [s for s in self.requests if s.path == path]

    def calls(self) -> list[Seen]:
        """What it was asked, less the watcher's probes."""
        return [s for s in self.requests if s.path not in PROBES]

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path, query = scope["path"], scope.get("query_string", b"").decode()
        seen = Seen(path + (f"?{query}" if query else ""), headers, body)
        (self.questions if "x-hal0-probe" in headers else self.requests).append(seen)
        call = Call(scope["method"], path, headers, body, receive, send)
        if path == "/health":
            return await self._health(send)
        if path == "/v1/models":
            return await self._models(send)
        endpoint = None if path in self.missing else route(path)
        if endpoint is None:
            return await send_json(send, 404, NO_ROUTE)
        if self.delay_headers_s:
            await asyncio.sleep(self.delay_headers_s)
        if self.fail_status:
            return await send_json(
                send, self.fail_status, {"error": {"message": f"{self.name} says no"}}
            )
        await endpoint(self, call)

    # --- the watcher's probes ----------------------------------------------------------------

    async def _health(self, send: Send) -> None:
        if self.health == "loading":
            return await send_json(send, 503, {"error": {"code": 503, "message": "Loading model"}})
        await send_json(send, 200 if self.health == "ready" else 500, {"status": "ok"})

    async def _models(self, send: Send) -> None:
        self.models_active += 1
        self.models_active_max = max(self.models_active_max, self.models_active)
        try:
            if self.models_delay_s:
                await asyncio.sleep(self.models_delay_s)
        finally:
            self.models_active -= 1
        if self.health == "loading":
            return await send_json(send, 503, {"error": {"message": "Loading model"}})
        if self.health == "error":
            return await send_json(send, 500, {"error": {"message": "broken"}})
        data = [self._listed(m) for m in self.models]
        await send_json(send, 200, {"object": "list", "data": data})

    def _listed(self, model: str) -> dict[str, Any]:
        if self.listing == "openai":
            return {"id": model, "object": "model", "owned_by": self.name}
        return {
            "id": model,
            "object": "model",
            # llama.cpp's server answers the time of each request here.
            "created": int(time.time() * 1000),
            "owned_by": "llamacpp",
            "context_length": 4096,
            "capabilities": ["completion"],
            "meta": {"n_ctx_train": 4096, "server": self.name},
        }

    # --- chat and text completions, embeddings -----------------------------------------------

    async def completion(self, call: Call) -> None:
        try:
            req = json.loads(call.body)
        except ValueError:
            return await send_json(call.send, 400, {"error": {"message": "bad json"}})
        if call.path == "/v1/embeddings":
            return await self._embedding(req, call.send)
        if req.get("stream"):
            return await self._stream(req, call.send, call.receive)
        text = self.reply or f"hello from {self.name}"
        answer = {
            "id": f"cmpl-{self.name}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model"),
            "slot": self.name,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
        cookie = [(b"set-cookie", self.set_cookie.encode())] if self.set_cookie else []
        await send_json(call.send, 200, answer, [*self.tag, *cookie])

    async def _embedding(self, req: dict[str, Any], send: Send) -> None:
        answer = {
            "object": "list",
            "model": req.get("model"),
            "slot": self.name,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
        await send_json(send, 200, answer)

    def _chunk(self, req: dict[str, Any], piece: str) -> bytes:
        event = {
            "id": f"cmpl-{self.name}",
            "object": "chat.completion.chunk",
            "model": req.get("model"),
            "slot": self.name,
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    def _usage_chunk(self) -> bytes:
        usage = {
            "id": f"cmpl-{self.name}",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": {
                "prompt_tokens": 5,
                "completion_tokens": self.chunks,
                "total_tokens": 5 + self.chunks,
            },
        }
        return b"data: " + json.dumps(usage).encode() + b"\n\n"

    async def _stream(self, req: dict[str, Any], send: Send, receive: Receive) -> None:
        await start_stream(send, b"text/event-stream", self.tag)
        self.active += 1
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    self.disconnects.append(time.monotonic())
                    gone.set()
                    return

        watcher = asyncio.create_task(watch())
        try:
            for comment in self.stream_comments:
                await send_part(send, f": {comment}\n\n".encode())
                try:
                    await asyncio.wait_for(gone.wait(), self.comment_gap_s)
                    return
                except TimeoutError:
                    pass
            text = self.reply or f"hello from {self.name}"
            for i in range(self.chunks):
                if gone.is_set():
                    return
                if self.break_after_chunks is not None and i == self.break_after_chunks:
                    raise RuntimeError("fake upstream drops the connection")
                await send_part(send, self._chunk(req, text if i == 0 else f" {i}"))
                if self.chunk_gap_s:
                    try:
                        await asyncio.wait_for(gone.wait(), self.chunk_gap_s)
                        return
                    except TimeoutError:
                        pass
            if self.stream_usage:
                await send_part(send, self._usage_chunk())
            await end_stream(send, b"data: [DONE]\n\n")
        finally:
            self.active -= 1
            watcher.cancel()


# Each path the fake serves (besides the probes), and what answers it.
ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat/completions": FakeUpstream.completion,
    "/v1/completions": FakeUpstream.completion,
    "/v1/embeddings": FakeUpstream.completion,
    "/v1/messages": fake_endpoints.messages,
    "/v1/messages/count_tokens": fake_endpoints.count_tokens,
    **dict.fromkeys(fake_endpoints.RERANK_PATHS, fake_endpoints.rerank),
    "/v1/audio/transcriptions": fake_endpoints.transcribe,
    "/v1/audio/translations": fake_endpoints.transcribe,
    "/v1/audio/speech": fake_endpoints.speech,
    "/v1/images/generations": fake_endpoints.generate_image,
    "/v1/images/edits": fake_endpoints.edit_image,
    "/v1/images/variations": fake_endpoints.edit_image,
}


def route(path: str) -> Endpoint | None:
    if path.startswith("/v1/responses"):
        return fake_responses.responses
    return ENDPOINTS.get(path)


class ServerThread:
    """Runs an ASGI app under Uvicorn on a loopback port in a background thread."""

    def __init__(
        self, app: Any, port: int | None = None, lifespan: Literal["auto", "on", "off"] = "on"
    ) -> None:
        self.app = app
        self.port = port or free_port()
        self._lifespan = lifespan
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan=self._lifespan,
            ws="websockets-sansio",
            timeout_graceful_shutdown=1,
        )
        server = self._server = uvicorn.Server(config)
        thread = self._thread = threading.Thread(target=server.run, daemon=True)
        thread.start()

        def started() -> bool:
            if server.started:
                return True
            if not thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start")
            return False

        wait_until(started, f"the server on port {self.port} to start", 10, every=0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None
