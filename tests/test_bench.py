"""The benchmark's own parts count what they claim to count (bench/ measures; these check).

No timing is asserted here: only that the fake sends what it is asked for, the load
generator counts events and coalesced arrivals correctly, and the resolver mix resolves.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from bench import load, resolver
from bench.fake import FakeProtocol
from bench.procs import Proc, affinity, tree_pids
from dispatch.routing.resolver import Decision, NoRoute, resolve
from tests.polling import wait_until


@pytest.fixture
async def fake_base() -> AsyncIterator[str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


async def test_fake_streams_the_events_it_is_asked_for(fake_base: str) -> None:
    async with load.session() as http:
        sample = await load.one_stream(http, fake_base + "/v1/chat/completions", 6, 20)
    assert sample.ok, sample.error
    assert sample.events == 6
    # 20 ms apart upstream: no two events can arrive in the same read.
    gaps = [b - a for a, b in zip(sample.arrivals, sample.arrivals[1:], strict=False)]
    assert len(gaps) == 5
    assert all(g > 0.001 for g in gaps)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _one_stream_from(handler: Handler, chunks: int, gap_ms: float) -> load.StreamSample:
    """What the load generator makes of one stream from a raw server running ``handler``."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with load.session() as http:
            url = f"http://127.0.0.1:{port}/v1/x"
            return await load.one_stream(http, url, chunks, gap_ms)
    finally:
        server.close()
        await server.wait_closed()


async def test_events_in_one_read_share_an_arrival_and_count_as_coalesced() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
        # Two events in one write (re-chunked by some proxy), then one alone 30 ms later.
        writer.write(head + b"data: one\n\ndata: two\n\n")
        await writer.drain()
        await asyncio.sleep(0.03)
        writer.write(b"data: three\n\n")
        await writer.drain()
        writer.close()

    sample = await _one_stream_from(handler, chunks=3, gap_ms=30)
    assert sample.ok and sample.events == 3
    assert sample.arrivals[0] == sample.arrivals[1] < sample.arrivals[2]
    devs, coalesced = load.gap_stats([sample], 30)
    assert len(devs) == 2
    assert coalesced == 1


async def test_a_short_stream_is_reported_incomplete() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
            b"data: one\n\ndata: two\n\n"
        )
        await writer.drain()
        writer.close()

    sample = await _one_stream_from(handler, chunks=5, gap_ms=10)
    assert sample.events == 2
    assert not sample.ok
    assert sample.error == "2 of 5 events"


async def test_closed_loop_counts_answers(fake_base: str) -> None:
    result = await load.closed_loop(fake_base, 4, 0.3, warmup_s=0.1)
    assert result.errors == 0
    assert result.requests == len(result.latencies_ms) > 0
    assert result.total >= result.requests


async def test_fixed_count_sends_exactly_that_many(fake_base: str) -> None:
    result = await load.fixed_count(fake_base, 8, 101)
    assert (result.requests, result.errors) == (101, 0)


def test_resolver_table_has_the_advertised_size_and_every_kind_resolves() -> None:
    table = resolver.build_table()
    assert len(table.slots) == resolver.SLOTS == 100
    assert all(len(s.models) == resolver.MODELS_PER_SLOT + 1 for s in table.slots.values())
    qualified = resolve(table, "slot-007/alias-7", "chat/completions")
    assert isinstance(qualified, Decision) and qualified.slot == "slot-007"
    alias = resolve(table, "alias-7", "chat/completions")
    assert isinstance(alias, Decision) and alias.resolution_path.startswith("alias:")
    miss = resolve(table, "no-such-model", "chat/completions")
    assert isinstance(miss, NoRoute) and miss.code == "model_not_found"


def test_stream_body_carries_a_prompt_of_the_asked_size() -> None:
    import orjson

    body = orjson.loads(load.stream_body(16))
    assert body["stream"] is True and body["model"] == orjson.loads(load.STREAM_BODY)["model"]
    assert len(body["messages"][0]["content"]) == 16_000


@pytest.mark.parametrize(
    "case",
    [
        "chat",
        "stream32",
        "chat-loads",
        "stream32-loads",
        "messages",
        "messages-translated",
        "stream32-messages",
        "stream32-messages-translated",
    ],
)
def test_the_in_process_driver_gets_each_case_answered(case: str, tmp_path) -> None:
    """bench/inproc.py (what `python -m bench instructions` counts) really routes its
    requests: it exits non-zero when one is answered with anything but 200."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "inproc.py"), case, "3"],
        cwd=root,
        env={**env, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_servers_cpu_time_counts_the_processes_it_started(tmp_path: Path) -> None:
    """Granian and Uvicorn's --workers serve from child processes: their CPU time belongs to
    the server's (bench/servers.py, bench/workers.py), not only the supervisor's."""
    burn = (
        "import time\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3:\n    pass\ntime.sleep(20)\n"
    )
    code = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {burn!r}]); time.sleep(20)"
    )
    proc = Proc("tree", [sys.executable, "-c", code], dict(os.environ), 0, 0, tmp_path / "log")
    proc.start()

    def burnt() -> dict[int, float] | None:
        by_pid = proc.cpu_by_pid()
        return by_pid if len(by_pid) == 2 and sum(by_pid.values()) >= 0.3 else None

    try:
        by_pid = wait_until(burnt, "the child to burn 0.3 s of CPU")
        assert by_pid is not None
        parent, child = by_pid
        assert parent == proc.pid and tree_pids(proc.pid) == [parent, child]
        assert by_pid[parent] < 0.3 <= proc.cpu_s()
        assert affinity(child) == "0"  # taskset's pinning holds for the children too
    finally:
        for pid in reversed(tree_pids(proc.pid)):
            os.kill(pid, signal.SIGKILL)
        assert proc.popen is not None
        proc.popen.wait(5)


async def test_a_lockstep_stream_waits_for_each_acknowledgement() -> None:
    """bench/served.py's stream case: the fake sends each next event only once the client
    says it has the last, so the router under test reads every event on its own."""
    from bench import fake, served

    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"X-Bench-Chunks: 4\r\nX-Bench-Lockstep: 1\r\n\r\n{}"
    )

    def held_back() -> tuple[bytes, bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request)
            first = b""
            while b"\n\n" not in first:  # the headers, then event 0 (CRLF-ended headers)
                first += sock.recv(65536)
            sock.settimeout(0.3)
            try:
                early = sock.recv(65536)  # nothing more until acknowledged
            except TimeoutError:
                early = b""
            sock.settimeout(10)
            fake.ack(port)
            return first, early, sock.recv(65536)

    def whole() -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(
            "POST", "/v1/chat/completions", b"{}", {"X-Bench-Chunks": "4", "X-Bench-Lockstep": "1"}
        )
        body = served._read_acking(conn.getresponse(), port)
        conn.close()
        return body

    async with fake.listening() as port:
        first, early, after_ack = await asyncio.to_thread(held_back)
        assert first.count(b"data:") == 1
        assert early == b""
        assert after_ack.count(b"data:") == 1
        body = await asyncio.to_thread(whole)
        assert body.count(b"data:") == 4 and body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("module", ["bench.minimal", "bench.bare_proxy"])
async def test_the_yardsticks_relay_what_the_upstream_answers(
    module: str, fake_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/served.py holds hal0web against these: each must be a real proxy, answering
    the fake's own bytes for a chat and every event of a stream."""
    import importlib

    import httpx

    yardstick = importlib.import_module(module)
    monkeypatch.setattr(yardstick, "UPSTREAM", fake_base + "/v1")
    monkeypatch.setattr(yardstick, "_session", None)  # one of an earlier test's loop
    chat = b'{"model":"bench-model","messages":[]}'
    async with httpx.AsyncClient(base_url=fake_base) as direct:
        expected = (await direct.post("/v1/chat/completions", content=chat)).content
    transport = httpx.ASGITransport(app=yardstick.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            answer = await client.post("/v1/chat/completions", content=chat)
            assert answer.status_code == 200
            assert answer.content == expected
            assert answer.headers["content-type"] == "application/json"
            stream = await client.post(
                "/v1/chat/completions", content=chat, headers={"X-Bench-Chunks": "4"}
            )
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.content.count(b"data:") == 4
            missing = await client.get("/elsewhere")
            assert missing.status_code in (404, 405)
    finally:
        await yardstick._session.close()


def test_the_objects_bench_makes_and_sends_a_chat_answer() -> None:
    """bench/objects.py counts what the /v1 path does with Django's objects: it must do it
    (a chat request read, its answer sent with hal0web's headers and its length)."""
    from bench import objects

    start, body = objects._child(1)
    headers = dict(start["headers"])
    assert start["status"] == 200
    assert headers[b"X-Hal0-Slot"] == b"bench"
    assert headers[b"X-Content-Type-Options"] == b"nosniff"
    assert int(headers[b"Content-Length"]) == len(objects.ANSWER) == len(body["body"])
