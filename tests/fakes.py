"""Fake OpenAI-compatible upstream servers, served over real loopback sockets.

Each fake tags every reply with its own slot name, so a test can tell which server answered.
Its health can be switched (ready, loading, down) and it records what it received and when
a client went away mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeUpstream:
    """An ASGI app that behaves like a small llama.cpp / OpenAI server."""

    name: str
    models: list[str] = field(default_factory=lambda: ["fake-model"])
    health: str = "ready"  # ready | loading | error
    chunks: int = 3
    chunk_gap_s: float = 0.0
    reply: str = ""
    fail_status: int | None = None  # answer every completion with this status
    delay_headers_s: float = 0.0
    models_delay_s: float = 0.0  # a slow /v1/models (a loaded server)
    break_after_chunks: int | None = None  # drop the connection mid-stream
    set_cookie: str = ""  # a Set-Cookie header on every completion answer
    stream_usage: bool = False  # end a stream with a usage-only chunk, as OpenAI's API can
    requests: list[Seen] = field(default_factory=list)
    disconnects: list[float] = field(default_factory=list)
    active: int = 0
    models_active: int = 0  # /v1/models requests being answered now
    models_active_max: int = 0

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body = await read_request(scope, receive, send)
        if body is None:
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        self.requests.append(Seen(path, headers, body))
        if path == "/health":
            if self.health == "loading":
                return await _json(send, 503, {"error": {"code": 503, "message": "Loading model"}})
            return await _json(send, 200 if self.health == "ready" else 500, {"status": "ok"})
        if path == "/v1/models":
            self.models_active += 1
            self.models_active_max = max(self.models_active_max, self.models_active)
            try:
                if self.models_delay_s:
                    await asyncio.sleep(self.models_delay_s)
            finally:
                self.models_active -= 1
            if self.health == "loading":
                return await _json(send, 503, {"error": {"message": "Loading model"}})
            if self.health == "error":
                return await _json(send, 500, {"error": {"message": "broken"}})
            data = [{"id": m, "object": "model", "owned_by": self.name} for m in self.models]
            return await _json(send, 200, {"object": "list", "data": data})
        if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            if self.delay_headers_s:
                await asyncio.sleep(self.delay_headers_s)
            if self.fail_status:
                return await _json(
                    send, self.fail_status, {"error": {"message": f"{self.name} says no"}}
                )
            try:
                req = json.loads(body)
            except ValueError:
                return await _json(send, 400, {"error": {"message": "bad json"}})
            if path == "/v1/embeddings":
                return await _json(
                    send,
                    200,
                    {
                        "object": "list",
                        "model": req.get("model"),
                        "slot": self.name,
                        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                        "usage": {"prompt_tokens": 1, "total_tokens": 1},
                    },
                )
            if req.get("stream"):
                return await self._stream(req, send, receive)
            text = self.reply or f"hello from {self.name}"
            return await _json(
                send,
                200,
                {
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
                },
                extra=[
                    (b"x-upstream-slot", self.name.encode()),
                    *([(b"set-cookie", self.set_cookie.encode())] if self.set_cookie else []),
                ],
            )
        await _json(send, 404, {"error": {"message": f"no route {path}"}})

    async def _stream(self, req: dict[str, Any], send: Send, receive: Receive) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"x-upstream-slot", self.name.encode()),
                ],
            }
        )
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
            text = self.reply or f"hello from {self.name}"
            for i in range(self.chunks):
                if gone.is_set():
                    return
                if self.break_after_chunks is not None and i == self.break_after_chunks:
                    raise RuntimeError("fake upstream drops the connection")
                piece = text if i == 0 else f" {i}"
                event = {
                    "id": f"cmpl-{self.name}",
                    "object": "chat.completion.chunk",
                    "model": req.get("model"),
                    "slot": self.name,
                    "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                }
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + json.dumps(event).encode() + b"\n\n",
                        "more_body": True,
                    }
                )
                if self.chunk_gap_s:
                    try:
                        await asyncio.wait_for(gone.wait(), self.chunk_gap_s)
                        return
                    except TimeoutError:
                        pass
            if self.stream_usage:
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
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + json.dumps(usage).encode() + b"\n\n",
                        "more_body": True,
                    }
                )
            await send(
                {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
            )
        finally:
            self.active -= 1
            watcher.cancel()


async def read_request(scope: dict[str, Any], receive: Receive, send: Send) -> bytes | None:
    """A fake server's start: its lifespan answered (None), or the request's whole body."""
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return None
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            return body


async def _json(
    send: Send, status: int, data: Any, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


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
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
            self._server = None


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which accepted connection carried it (1, 2, ...)
    index: int  # its place on that connection (1 = first request)


# What a raw upstream does with one request: write whatever it likes on the socket; return
# True to keep the connection for the next request, False to close it.
RawBehaviour = Callable[[socket.socket, RawRequest], bool]


def http_response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    extra: tuple[tuple[str, str], ...] = (),
    length: bool = True,
) -> bytes:
    """One HTTP/1.1 response as bytes; ``length=False`` leaves the body close-delimited."""
    head = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}"]
    if length:
        head.append(f"Content-Length: {len(body)}")
    else:
        head.append("Connection: close")
    head += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN: what a crashed or killed server leaves."""
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class RawUpstream:
    """An HTTP/1.1 server on a raw loopback socket, for faults no framework would commit:
    a reset mid-event, garbage, a keep-alive connection closed under the next request.

    Each request is parsed (headers and a Content-Length body) and handed to ``behaviour``
    in the connection's own thread. ``open_connections`` counts connections not yet closed
    by either side, so a test can check that nothing leaked.
    """

    def __init__(self, behaviour: RawBehaviour) -> None:
        self.behaviour = behaviour
        self.requests: list[RawRequest] = []
        self.accepted = 0
        self.open_connections = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open_connections += 1
                number = self.accepted
            t = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        buf = b""
        index = 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                index += 1
                request = RawRequest(method, path, headers, body, number, index)
                with self._lock:
                    self.requests.append(request)
                if not self.behaviour(sock, request):
                    return
        except OSError:
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self.open_connections -= 1

    def completions(self) -> list[RawRequest]:
        return [r for r in self.requests if "/completions" in r.path]

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
