"""The proxy: pass-through, transport failures, timeouts, mid-stream failure, disconnects."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import pytest

from dispatch.routing.table import make_slot
from dispatch.upstream.client import Upstream
from dispatch.upstream.response import UpstreamError
from tests.conftest import add_slot
from tests.fakes import FakeUpstream, ServerThread, free_port
from tests.polling import wait_until

# --- unit: the seam, with httpx.MockTransport ------------------------------------------------


def slot(**kw):
    return make_slot("s", "http://upstream.test/v1", **kw)


async def test_open_forwards_body_and_filters_headers():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            201,
            content=b'{"ok":1}',
            headers={
                "content-type": "application/json",
                "x-extra": "yes",
                "connection": "close",
                "set-cookie": "a=b",
                # Which browser origins may read /v1 is hal0web's call, not the upstream's.
                "access-control-allow-origin": "*",
                "access-control-allow-credentials": "true",
            },
        )

    up = Upstream(httpx.MockTransport(handler))
    resp = await up.open(
        slot(),
        "chat/completions",
        b'{"model":"m"}',
        {
            "Content-Type": "application/json",
            "Authorization": "Bearer client",
            # hal0web's key as the anthropic SDK and Azure clients send it, and a proxy's.
            "x-api-key": "hal0-client-key",
            "api-key": "hal0-client-key",
            "Proxy-Authorization": "Basic cHJveHk6cHc=",
            "Cookie": "s=1",
            "Connection": "keep-alive",
            "X-Custom": "1",
        },
    )
    assert resp.status_code == 201
    assert await resp.read(2**20) == b'{"ok":1}'
    assert dict(resp.headers()) == {"content-type": "application/json", "x-extra": "yes"}
    req = seen[0]
    assert str(req.url) == "http://upstream.test/v1/chat/completions"
    assert req.content == b'{"model":"m"}'
    for name in ("authorization", "cookie", "x-api-key", "api-key", "proxy-authorization"):
        assert name not in req.headers, name
    assert req.headers["x-custom"] == "1" and req.headers["accept-encoding"] == "identity"
    await up.aclose()


async def test_the_answers_headers_are_read_as_httpx_reads_them():
    def handler(request: httpx.Request) -> httpx.Response:
        headers = [
            ("Content-Type", "text/event-stream"),
            ("X-Part", "1"),
            ("x-part", "2"),
            ("Retry-After", "7"),
            ("Content-Encoding", "identity"),
            ("Server", "upstream"),
        ]
        return httpx.Response(200, headers=headers, content=b"data: {}\n\n")

    up = Upstream(httpx.MockTransport(handler))
    resp = await up.open(slot(), "chat/completions", b"{}", {})
    assert resp.content_type == "text/event-stream" and resp.is_event_stream
    assert resp.header("X-PART") == "1, 2" and resp.header("retry-after") == "7"
    assert resp.header("x-missing") is None and resp.encoding == ""
    assert list(resp.headers()) == [
        ("content-type", "text/event-stream"),
        ("x-part", "1"),
        ("x-part", "2"),
        ("retry-after", "7"),
    ]
    await up.aclose()


async def test_slot_key_is_sent_from_its_env_var(monkeypatch):
    monkeypatch.setenv("SLOT_KEY_T", "sk-1")
    seen: list[httpx.Request] = []
    up = Upstream(httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200)))
    await (await up.open(slot(api_key_env="SLOT_KEY_T"), "x", b"{}", {})).read(2**20)
    assert seen[0].headers["authorization"] == "Bearer sk-1"
    await up.aclose()


async def test_a_cookie_one_upstream_answer_sets_never_rides_on_a_later_request():
    # Requests from different users share the seam: a cookie jar there would hand one user's
    # upstream session to the next.
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"set-cookie": "sid=user-a; Path=/"}, content=b"{}")

    up = Upstream(httpx.MockTransport(handler))
    for _ in range(2):
        await (await up.open(slot(), "chat/completions", b"{}", {})).read(2**20)
    assert len(seen) == 2 and "cookie" not in seen[1].headers
    await up.aclose()


async def test_connection_failure_is_unreachable():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    up = Upstream(httpx.MockTransport(handler))
    with pytest.raises(UpstreamError) as exc:
        await up.open(slot(), "x", b"{}", {})
    assert exc.value.kind == "unreachable" and "'s'" in exc.value.message
    await up.aclose()


# --- integration: real sockets ----------------------------------------------------------------


@pytest.fixture
def one_fake(transactional_db):
    fake = FakeUpstream("solo", models=["m1"])
    server = ServerThread(fake).start()
    yield fake, server
    server.stop()


def _client(hal0) -> httpx.Client:
    return httpx.Client(base_url=hal0.url, timeout=15)


def test_upstream_errors_pass_through_as_they_are(one_fake, hal0):
    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"])
    fake.fail_status = 422
    with _client(hal0) as c:
        r = c.post("/v1/chat/completions", json={"model": "m1", "messages": []})
    assert r.status_code == 422
    assert r.json() == {"error": {"message": "solo says no"}}
    assert r.headers["X-Hal0-Slot"] == "solo"


def test_refused_connection_is_502_upstream_unreachable(transactional_db, no_watcher, hal0):
    # (no_watcher: a probe first would mark the slot offline: 503, not this path)
    add_slot("gone", f"http://127.0.0.1:{free_port()}/v1", ["m1"])
    with _client(hal0) as c:
        r = c.post("/v1/chat/completions", json={"model": "m1", "messages": []})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"
    assert r.headers["X-Hal0-Slot"] == "gone"


def test_no_headers_within_first_byte_timeout_is_504(one_fake, hal0):
    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"], first_byte_timeout_s=0.3)
    fake.delay_headers_s = 3
    with _client(hal0) as c:
        r = c.post("/v1/chat/completions", json={"model": "m1", "messages": []})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"


def test_stream_going_idle_ends_with_an_error_event(one_fake, hal0):
    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"], idle_timeout_s=0.3)
    fake.chunks, fake.chunk_gap_s = 3, 2
    with _client(hal0) as c:
        r = c.post("/v1/chat/completions", json={"model": "m1", "stream": True, "messages": []})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[0][6:])["slot"] == "solo"
    last = json.loads(events[-1][6:])
    assert last["error"]["code"] == "upstream_idle"


def test_failure_mid_stream_ends_cleanly_with_one_error_event(one_fake, hal0):
    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"])
    fake.chunks, fake.break_after_chunks = 5, 2
    with _client(hal0) as c:
        r = c.post("/v1/chat/completions", json={"model": "m1", "stream": True, "messages": []})
    events = [e for e in r.text.split("\n\n") if e]
    assert len(events) == 3
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:2]] == [
        "hello from solo",
        " 1",
    ]
    assert json.loads(events[2][6:])["error"]["code"] == "upstream_broken"


def test_client_disconnect_cancels_the_upstream_request_within_a_second(one_fake, hal0):
    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"])
    fake.chunks, fake.chunk_gap_s = 1000, 0.05
    body = json.dumps({"model": "m1", "stream": True, "messages": []}).encode()
    port = int(hal0.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    got = b""
    while b"hello from solo" not in got:
        got += sock.recv(65536)
    assert fake.active == 1
    closed_at = time.monotonic()
    sock.close()
    wait_until(lambda: fake.disconnects, "the upstream to see the client go away", 5, 0.01)
    assert fake.disconnects[0] - closed_at < 1.0


def test_client_gone_before_the_upstream_answers_frees_the_slot(one_fake, hal0, caplog):
    from dispatch.upstream.admission import admission

    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"])
    fake.delay_headers_s = 1.0
    body = json.dumps({"model": "m1", "messages": []}).encode()
    port = int(hal0.url.rsplit(":", 1)[1])
    with caplog.at_level("INFO", logger="hal0.dispatch"):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(
            lambda: [r for r in fake.requests if r.path == "/v1/chat/completions"],
            "the request to reach the upstream",
            5,
            0.01,
        )
        assert admission.inflight.get("solo") == 1
        sock.close()
        wait_until(
            lambda: not admission.inflight.get("solo"),
            "the slot to give back the place of a client long gone",
            5,
            0.01,
        )
        wait_until(lambda: _decisions(caplog), "the request's decision line", 5, 0.01)
    (decision,) = _decisions(caplog)
    assert decision["slot"] == "solo" and decision["error"] == "client_disconnected"


def _decisions(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "hal0.dispatch"]


def test_large_concurrent_streams_arrive_whole(one_fake, hal0):
    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"])
    fake.chunks = 50

    async def one(c: httpx.AsyncClient) -> int:
        r = await c.post(
            "/v1/chat/completions", json={"model": "m1", "stream": True, "messages": []}
        )
        return r.text.count("data: ")

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=hal0.url, timeout=30) as c:
            return await asyncio.gather(*(one(c) for _ in range(20)))

    result: list[list[int]] = []
    t = threading.Thread(target=lambda: result.append(asyncio.run(main())))
    t.start()
    t.join()
    assert result[0] == [51] * 20


def test_an_open_stream_does_not_hold_on_to_its_request_body(one_fake, hal0):
    # Thousands of streams can be open at once, each from a prompt of tens of kilobytes: once
    # the upstream has the body, hal0web must let go of it.
    import tracemalloc

    fake, server = one_fake
    add_slot("solo", server.url + "/v1", ["m1"])
    fake.chunks, fake.chunk_gap_s = 100, 0.05
    prompt = "p" * (4 * 1024 * 1024)
    body = json.dumps({"model": "m1", "stream": True, "messages": [{"content": prompt}]})
    tracemalloc.start(40)
    try:
        with (
            httpx.Client(base_url=hal0.url, timeout=15) as c,
            c.stream("POST", "/v1/chat/completions", content=body) as r,
        ):
            lines = r.iter_lines()
            while "hello from solo" not in next(lines):
                pass
            snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    tests_dir = os.path.dirname(__file__)
    held = [
        s.traceback
        for s in snapshot.statistics("traceback")
        if s.size >= len(prompt)
        # (not this test's own copies, nor the fake upstream's: both live in tests/)
        and not any(f.filename.startswith(tests_dir) for f in s.traceback)
    ]
    assert not held, "\n\n".join("\n".join(t.format()) for t in held)
