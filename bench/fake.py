"""A fake OpenAI-compatible upstream that is never the bottleneck.

Raw asyncio + httptools (the parser uvicorn uses) on uvloop, keep-alive HTTP/1.1, answers
precomputed. What a request gets is chosen by its headers, which hal0web forwards untouched:

- ``X-Bench-Chunks: N`` → an SSE stream of N events (the last is ``[DONE]``), one every
  ``X-Bench-Gap-Ms`` milliseconds (default 10), the first with the response headers; with
  ``X-Bench-Lockstep: 1`` instead, each next event only once the client has said it got the
  last (a UDP datagram to this server's port number), so that every event is its own read
  all the way through however slow the router under test is (bench/served.py, callgrind).
- otherwise → a small non-streaming ``chat.completion`` JSON body.

``GET /v1/models`` and ``GET /health`` answer so hal0web's watcher sees the slot ready.

Under ``/router/`` it also passes for llama.cpp's router with its one model loaded (issue 21:
a slot that loads models, on the path of a request for a loaded model): the listing's entry
carries ``status: {"value": "loaded"}``, ``GET /router/props`` says ``"role": "router"``
with ``max_instances`` 1, and ``GET /router/models/sse`` opens an event stream that stays
quiet (nothing loads or unloads).

Run: ``python -m bench.fake PORT`` (prints ``ready`` when listening).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from typing import cast

import httptools
import orjson

MODEL = "bench-model"

_COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    }
)
_MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]})
_HEALTH = b'{"status":"ok"}'
_ROUTER_MODELS = orjson.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "status": {"value": "loaded"}}]}
)
_ROUTER_PROPS = orjson.dumps({"role": "router", "max_instances": 1, "models_autoload": True})
ROUTER = b"/router/"


def _response(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


RESP_COMPLETION = _response(b"200 OK", _COMPLETION)
RESP_MODELS = _response(b"200 OK", _MODELS)
RESP_HEALTH = _response(b"200 OK", _HEALTH)
RESP_ROUTER_MODELS = _response(b"200 OK", _ROUTER_MODELS)
RESP_ROUTER_PROPS = _response(b"200 OK", _ROUTER_PROPS)
RESP_404 = _response(b"404 Not Found", b'{"error":{"message":"not found"}}')
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def sse_event(i: int) -> bytes:
    data = (
        b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"'
        + MODEL.encode()
        + b'","choices":[{"index":0,"delta":{"content":"tok'
        + str(i).encode()
        + b'"}}]}\n\n'
    )
    return _chunk(data)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


DONE = _chunk(b"data: [DONE]\n\n")
END = b"0\r\n\r\n"


class FakeProtocol(asyncio.Protocol):
    __slots__ = ("chunks", "gap_ms", "lockstep", "parser", "stream_task", "transport", "url")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.chunks = 0
        self.gap_ms = 10.0
        self.lockstep = False
        self.stream_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.stream_task is not None:
            self.stream_task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.chunks = 0
        self.gap_ms = 10.0
        self.lockstep = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"x-bench-chunks":
            self.chunks = int(value)
        elif lname == b"x-bench-gap-ms":
            self.gap_ms = float(value)
        elif lname == b"x-bench-lockstep":
            self.lockstep = value == b"1"

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        url = self.url
        if url.endswith(b"/completions") or url.endswith(b"/embeddings"):
            if self.chunks > 0:
                stream = (
                    self._lockstep(transport, self.chunks)
                    if self.lockstep
                    else self._stream(transport, self.chunks, self.gap_ms / 1000.0)
                )
                self.stream_task = asyncio.get_running_loop().create_task(stream)
            else:
                transport.write(RESP_COMPLETION)
        elif url.startswith(ROUTER):
            self._router(transport, url)
        elif url.endswith(b"/models"):
            transport.write(RESP_MODELS)
        elif url.endswith(b"/health"):
            transport.write(RESP_HEALTH)
        else:
            transport.write(RESP_404)

    @staticmethod
    def _router(transport: asyncio.Transport, url: bytes) -> None:
        if url.endswith(b"/v1/models"):
            transport.write(RESP_ROUTER_MODELS)
        elif url.endswith(b"/props"):
            transport.write(RESP_ROUTER_PROPS)
        elif url.endswith(b"/models/sse"):
            transport.write(SSE_HEAD)  # and nothing more: no model loads or unloads here
        elif url.endswith(b"/health"):
            transport.write(RESP_HEALTH)
        else:
            transport.write(RESP_404)

    async def _stream(self, transport: asyncio.Transport, n: int, gap: float) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        transport.write(SSE_HEAD + (sse_event(0) if n > 1 else DONE))
        for i in range(1, n):
            # Sleep to an absolute schedule so the upstream's own gaps do not drift.
            await asyncio.sleep(max(0.0, start + i * gap - loop.time()))
            if transport.is_closing():
                return
            transport.write(sse_event(i) if i < n - 1 else DONE)
        transport.write(END)
        self.stream_task = None

    async def _lockstep(self, transport: asyncio.Transport, n: int) -> None:
        acks = _acks()
        while not acks.empty():  # a stale ack from an earlier stream must not run ahead
            acks.get_nowait()
        transport.write(SSE_HEAD + (sse_event(0) if n > 1 else DONE))
        for i in range(1, n):
            try:
                await asyncio.wait_for(acks.get(), LOCKSTEP_WAIT_S)
            except TimeoutError:
                pass  # a client that never acks gets the rest at this pace, not a hang
            if transport.is_closing():
                return
            transport.write(sse_event(i) if i < n - 1 else DONE)
        transport.write(END)
        self.stream_task = None


# How long a lockstep stream waits for the client's word before sending the next event.
LOCKSTEP_WAIT_S = 10.0
_ACKS: asyncio.Queue[None] | None = None


def _acks() -> asyncio.Queue[None]:
    """The client's acknowledgements, one per event received (one lockstep stream at a time)."""
    global _ACKS
    if _ACKS is None:
        _ACKS = asyncio.Queue()
    return _ACKS


class _AckProtocol(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        _acks().put_nowait(None)


def ack(port: int) -> None:
    """Tell the fake on ``port`` that the client got the last event (lockstep streams)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"1", ("127.0.0.1", port))


@contextlib.asynccontextmanager
async def listening(port: int = 0) -> AsyncIterator[int]:
    """The fake's HTTP server on ``port`` (0: any free one) and the UDP port of the same
    number for lockstep acks, while in the block; yields the port."""
    global _ACKS
    _ACKS = asyncio.Queue()  # this loop's
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeProtocol, "127.0.0.1", port, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    acks, _ = await loop.create_datagram_endpoint(_AckProtocol, local_addr=("127.0.0.1", port))
    try:
        async with server:
            yield port
    finally:
        acks.close()


async def serve(port: int) -> None:
    async with listening(port):
        print("ready", flush=True)
        await asyncio.Event().wait()  # until the process is stopped


def main() -> None:
    import uvloop

    uvloop.run(serve(int(sys.argv[1])))


if __name__ == "__main__":
    main()
