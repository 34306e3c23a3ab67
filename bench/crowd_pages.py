"""A crowd of live pages for ``python -m bench crowds``: N WebSocket clients in one process.

Run as ``python -m bench.crowd_pages HOST PORT COOKIE ORIGIN`` and driven over stdin, one
command a line, each answered with one JSON line on stdout:

- ``open N``: open N pages at once (as after a restart: every page reconnects in the same
  instant) and say how each handshake went (``ok``, an HTTP status, or an error's name).
- ``reset``: forget what the pages heard so far.
- ``report``: per page, the request ids of the decisions it heard (from single events and
  from batches alike), the events the server told it it missed, and the frames it got.
- ``close``: close every page.

The pages must keep up with what they are sent, or the server's sends wait for them and the
figures say more about this process than about hal0web; and they share a core with the load
generator. So a page is a bare asyncio protocol (uvloop) that reads the frames itself and
finds the decisions' request ids with a regular expression, where a browser would parse
the JSON: a few microseconds a frame, not the websockets library's tens.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import struct
import sys
import time
from typing import cast

import orjson
import uvloop

REQUEST_ID = re.compile(rb'"request_id":"([^"]+)"')
MISSED = re.compile(rb'^\{"type":"batch","missed":(\d+)')
OPEN_TIMEOUT_S = 60.0


class Page(asyncio.Protocol):
    def __init__(self, request: bytes) -> None:
        self.request = request
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.ids: set[bytes] = set()
        self.missed = 0
        self.frames = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is none of asyncio's
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._settle("closed before the snapshot")

    def _settle(self, outcome: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = self.buffer[: self.buffer.find(b"\r\n")].split(b" ")
            if len(status) < 2 or status[1] != b"101":
                self._settle(status[1].decode() if len(status) > 1 else "no status")
                assert self.transport is not None
                self.transport.close()
                return
            del self.buffer[: end + 4]
            self.upgraded = True
        self._frames()

    def _frames(self) -> None:
        buf = self.buffer
        while len(buf) >= 2:
            opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
            at = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = struct.unpack_from("!H", buf, 2)[0], 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            if opcode == 0x9:  # ping: answer, masked as a client must
                self._send(0xA, payload)
            elif opcode == 0x8:
                self.closed = True
            elif opcode in (0x1, 0x0):
                self._message(payload)

    def _message(self, payload: bytes) -> None:
        if not self.outcome.done():
            ok = payload.startswith(b'{"type":"snapshot"')
            self._settle("ok" if ok else "first message not a snapshot")
            return
        self.frames += 1
        self.ids.update(REQUEST_ID.findall(payload))
        missed = MISSED.match(payload)
        if missed:
            self.missed += int(missed.group(1))

    def _send(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send(0x8, struct.pack("!H", 1000))
            self.transport.close()


def upgrade_request(host: str, port: int, cookie: str, origin: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws/dispatch/ HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Cookie: {cookie}\r\nOrigin: {origin}\r\n\r\n"
    ).encode()


async def open_one(host: str, port: int, request: bytes) -> Page | str:
    loop = asyncio.get_running_loop()
    try:
        _, page = await asyncio.wait_for(
            loop.create_connection(lambda: Page(request), host, port), OPEN_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__
    try:
        outcome = await asyncio.wait_for(asyncio.shield(page.outcome), OPEN_TIMEOUT_S)
    except TimeoutError:
        outcome = "no snapshot in time"
    if outcome != "ok":
        page.close()
        return outcome
    return page


async def main(host: str, port: str, cookie: str, origin: str) -> None:
    request = upgrade_request(host, int(port), cookie, origin)
    pages: list[Page] = []
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(obj: object) -> None:
        sys.stdout.buffer.write(orjson.dumps(obj) + b"\n")
        sys.stdout.flush()

    while line := (await reader.readline()).decode().strip():
        command, _, arg = line.partition(" ")
        if command == "open":
            t0 = time.perf_counter()
            opened = await asyncio.gather(
                *(open_one(host, int(port), request) for _ in range(int(arg)))
            )
            seconds = time.perf_counter() - t0
            counts: dict[str, int] = {}
            for one in opened:
                key = "ok" if isinstance(one, Page) else one
                counts[key] = counts.get(key, 0) + 1
            pages.extend(p for p in opened if isinstance(p, Page))
            say({"outcomes": counts, "seconds": seconds, "open": len(pages)})
        elif command == "reset":
            for p in pages:
                p.ids.clear()
                p.missed, p.frames = 0, 0
            say({"ok": True})
        elif command == "report":
            say(
                {
                    "pages": [sorted(i.decode() for i in p.ids) for p in pages],
                    "missed": [p.missed for p in pages],
                    "frames": [p.frames for p in pages],
                    "closed": sum(1 for p in pages if p.closed),
                }
            )
        elif command == "close":
            for p in pages:
                p.close()
            pages.clear()
            await asyncio.sleep(0.5)  # the server hears the closes before the next cell
            say({"ok": True})


if __name__ == "__main__":
    uvloop.run(main(*sys.argv[1:5]))
