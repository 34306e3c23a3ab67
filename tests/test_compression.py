"""Compressed upstream answers (issue 14): never inflated without a cap, never mangled.

hal0web asks every upstream for ``identity``; one that compresses anyway gets its stream
passed through as it is, with its ``Content-Encoding`` (the client decodes it), and its
non-streamed answer decoded under ``HAL0_MAX_RESPONSE_MB`` (to check it is JSON and read
its usage): past the cap the answer is 502 ``upstream_response_too_large``, whatever its
compressed size.
"""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib

import httpx
import pytest

from dispatch.upstream.client import Upstream
from tests.raw_upstream import RawUpstream, chunk, http_response
from tests.test_faults import COMPLETION, SSE_HEAD, raw  # noqa: F401 - the fixture

pytestmark = pytest.mark.usefixtures("no_watcher")

EVENTS = (
    b"".join(
        b'data: {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, '
        b'"delta": {"content": "%d"}}]}\n\n' % i
        for i in range(20)
    )
    + b"data: [DONE]\n\n"
)


def gzip_answer(body: bytes, encoding: str = "gzip"):
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)

    def behaviour(sock, request):
        sock.sendall(http_response(200, packed, extra=(("Content-Encoding", encoding),)))
        return True

    return behaviour


def post(hal0, stream: bool = False) -> httpx.Response:
    # httpx decodes gzip itself, as the SDKs do: what a client sees.
    with httpx.Client(base_url=hal0.url, timeout=30) as c:
        return c.post(
            "/v1/chat/completions", json={"model": "m1", "stream": stream, "messages": []}
        )


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_answer_reaches_the_client_whole(raw, hal0, encoding):  # noqa: F811
    raw(gzip_answer(COMPLETION, encoding))
    r = post(hal0)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hi"


def test_a_gzip_bomb_is_refused_past_the_cap_without_inflating_it(raw, hal0, settings):  # noqa: F811
    settings.HAL0_MAX_RESPONSE_MB = 1
    # 10 MB of spaces inside a JSON string: ~10 KB on the wire, 1000:1.
    bomb = b'{"id": "x", "pad": "' + b" " * (10 * 1024 * 1024) + b'"}'
    raw(gzip_answer(bomb))
    r = post(hal0)
    assert r.status_code == 502, r.text[:300]
    error = r.json()["error"]
    assert error["code"] == "upstream_response_too_large"
    assert "HAL0_MAX_RESPONSE_MB" in error["message"]


def test_a_plain_answer_past_the_cap_is_refused_too(raw, hal0, settings):  # noqa: F811
    settings.HAL0_MAX_RESPONSE_MB = 1
    big = b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'

    def behaviour(sock, request):
        sock.sendall(http_response(200, big))
        return True

    raw(behaviour)
    r = post(hal0)
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_response_too_large"


def test_a_gzip_stream_passes_through_with_its_encoding(raw, hal0):  # noqa: F811
    packed = gzip.compress(EVENTS)

    def behaviour(sock, request):
        head = SSE_HEAD.replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n")
        sock.sendall(head + chunk(packed[:100]) + chunk(packed[100:]) + b"0\r\n\r\n")
        return True

    raw(behaviour)
    with (
        httpx.Client(base_url=hal0.url, timeout=30) as c,
        c.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "m1", "stream": True, "messages": []},
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"
        raw_bytes = b"".join(r.iter_raw())
    assert raw_bytes == packed  # as the upstream sent it, not re-encoded
    text = gzip.decompress(raw_bytes).decode()
    assert [
        json.loads(line[6:])["choices"][0]["delta"]["content"]
        for line in text.split("\n\n")
        if line.startswith("data: {")
    ] == [str(i) for i in range(20)]


async def test_a_probe_never_inflates_a_bomb_past_the_cap():
    # The watcher reads every slot's /models: a hostile upstream's 64 MB-inflating answer of
    # ~64 KB must cost a probe at most the cap, not 64 MB on the event loop.
    bomb = gzip.compress(b'{"data": [' + b" " * (64 * 1024 * 1024) + b"]}")
    server = RawUpstream(
        lambda sock, request: (
            sock.sendall(http_response(200, bomb, extra=(("Content-Encoding", "gzip"),))) or True
        )
    )
    up = Upstream()
    try:
        tracemalloc.start()
        result = await up.probe(server.url + "/v1/models", 10, limit=2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await up.aclose()
        server.stop()
    assert result.status == 200 and result.body is None
    assert "larger than 1 MB" in result.error
    assert peak < 8 * 2**20, f"the probe held {peak / 2**20:.1f} MB"
    assert server.requests[0].headers["accept-encoding"] == "identity"
