"""An NDJSON stream (Ollama's framing) through hal0web: relayed as it arrives, chunk by
chunk and unchanged, and ended with one NDJSON error line when it fails after its first
byte. The upstream is a raw loopback socket server (tests/fakes.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import add_slot
from tests.polling import wait_until
from tests.raw_upstream import RawRequest, RawUpstream, chunk, reset

NDJSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)
LINES = [
    b'{"model":"m1","message":{"role":"assistant","content":"he"},"done":false}\n',
    b'{"model":"m1","message":{"role":"assistant","content":"llo"},"done":false}\n',
    b'{"model":"m1","done":true,"prompt_eval_count":5,"eval_count":2}\n',
]


@pytest.fixture
def raw(transactional_db: None) -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(behaviour: Callable[[socket.socket, RawRequest], bool]) -> RawUpstream:
        upstream = RawUpstream(behaviour)
        made.append(upstream)
        add_slot("a", upstream.url + "/v1", ["m1"])
        return upstream

    yield make
    for upstream in made:
        upstream.stop()


@contextmanager
def _stream(hal0) -> Iterator[httpx.Response]:
    body = {"model": "m1", "stream": True, "messages": []}
    with (
        httpx.Client(base_url=hal0.url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        yield response


def test_an_ndjson_stream_arrives_unchanged_chunk_by_chunk(raw, no_watcher, hal0, caplog):
    # Each line goes out only once the client has the one before: a relay that buffered the
    # stream (or took it for a JSON answer) would never let the next one go.
    received = [threading.Event() for _ in LINES]

    def behaviour(sock: socket.socket, req: RawRequest) -> bool:
        sock.sendall(NDJSON_HEAD)
        for line, got in zip(LINES, received, strict=True):
            sock.sendall(chunk(line))
            if not got.wait(5):
                return False
        sock.sendall(b"0\r\n\r\n")
        return True

    raw(behaviour)
    with caplog.at_level("INFO", logger="hal0.dispatch"), _stream(hal0) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-ndjson"
        chunks: list[bytes] = []
        sent = 0
        for part in response.iter_raw():
            chunks.append(part)
            while sent < len(LINES) and b"".join(chunks) == b"".join(LINES[: sent + 1]):
                received[sent].set()
                sent += 1
    assert chunks == LINES
    # Counted with Ollama's names, from its last line.
    wait_until(lambda: caplog.records, "the decision's log line")
    line = json.loads(caplog.records[-1].getMessage())
    assert (line["prompt_tokens"], line["completion_tokens"], line["error"]) == (5, 2, None)


def _body(hal0) -> bytes:
    with _stream(hal0) as response:
        return response.read()


def test_a_failure_after_the_first_byte_ends_with_one_ndjson_error_line(raw, no_watcher, hal0):
    def behaviour(sock: socket.socket, req: RawRequest) -> bool:
        sock.sendall(NDJSON_HEAD + chunk(LINES[0]))
        time.sleep(0.2)
        reset(sock)
        return False

    raw(behaviour)
    body = _body(hal0)
    first, error, end = body.split(b"\n")
    assert first + b"\n" == LINES[0] and end == b""
    assert json.loads(error)["code"] == "upstream_broken"


def test_a_stream_ended_inside_a_line_gets_the_line_closed_then_the_error(raw, no_watcher, hal0):
    def behaviour(sock: socket.socket, req: RawRequest) -> bool:
        sock.sendall(NDJSON_HEAD + chunk(LINES[0]) + chunk(b'{"model":"m1",') + b"0\r\n\r\n")
        return True

    raw(behaviour)
    lines = _body(hal0).split(b"\n")
    assert lines[0] + b"\n" == LINES[0] and lines[1] == b'{"model":"m1",' and lines[-1] == b""
    assert json.loads(lines[2])["code"] == "upstream_truncated" and len(lines) == 4
