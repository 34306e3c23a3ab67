"""The load generator: an aiohttp client with its own pool, closed-loop workers.

Every function here runs on the driver's event loop (uvloop), pinned with the fake to core 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from bench.fake import MODEL

BODY = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16}
)
STREAM_BODY = orjson.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
        "stream": True,
    }
)
JSON_HEADERS = {"content-type": "application/json"}


def stream_body(prompt_kb: float) -> bytes:
    """A streaming request whose user message is ``prompt_kb`` KB long (a long chat)."""
    text = "x" * int(prompt_kb * 1000)
    return orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": True}
    )


def session(limit: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
        auto_decompress=False,
    )


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    total: int = 0  # every answered request, warm-up included (for CPU per request)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def closed_loop(
    base: str, concurrency: int, seconds: float, warmup_s: float = 0.5
) -> LoadResult:
    """``concurrency`` workers, each sending the next request when the last one is answered."""
    url = base + "/v1/chat/completions"
    latencies: list[float] = []
    counters = {"ok": 0, "err": 0, "all": 0}
    loop = asyncio.get_running_loop()
    async with session(concurrency) as http:
        t_start = loop.time()
        t_measure = t_start + warmup_s
        t_end = t_measure + seconds

        async def worker() -> None:
            perf = time.perf_counter
            while True:
                t0 = perf()
                if loop.time() >= t_end:
                    return
                try:
                    async with http.post(url, data=BODY, headers=JSON_HEADERS) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                t1 = perf()
                counters["all"] += 1
                now = loop.time()
                if t_measure <= now <= t_end:
                    if ok:
                        counters["ok"] += 1
                        latencies.append((t1 - t0) * 1000.0)
                    else:
                        counters["err"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(counters["ok"], counters["err"], seconds, latencies, counters["all"])


async def fixed_count(base: str, concurrency: int, total: int) -> LoadResult:
    """Exactly ``total`` requests over ``concurrency`` workers (for the RSS growth run)."""
    url = base + "/v1/chat/completions"
    remaining = [total]
    counters = {"ok": 0, "err": 0}
    async with session(concurrency) as http:
        t0 = time.perf_counter()

        async def worker() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                try:
                    async with http.post(url, data=BODY, headers=JSON_HEADERS) as resp:
                        await resp.read()
                        counters["ok" if resp.status == 200 else "err"] += 1
                except aiohttp.ClientError:
                    counters["err"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return LoadResult(counters["ok"], counters["err"], elapsed, [])


@dataclass
class StreamSample:
    ttft_ms: float = 0.0
    events: int = 0
    arrivals: list[float] = field(default_factory=list)  # per event: when its bytes arrived
    ok: bool = True
    error: str = ""


async def one_stream(
    http: aiohttp.ClientSession, url: str, chunks: int, gap_ms: float, body: bytes = STREAM_BODY
) -> StreamSample:
    sample = StreamSample()
    headers = {**JSON_HEADERS, "x-bench-chunks": str(chunks), "x-bench-gap-ms": str(gap_ms)}
    perf = time.perf_counter
    t0 = perf()
    try:
        async with http.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                sample.ok, sample.error = False, f"status {resp.status}"
                await resp.read()
                return sample
            tail = b""
            async for data in resp.content.iter_any():
                now = perf()
                buf = tail + data
                n = buf.count(b"\n\n")
                if n:
                    if sample.events == 0:
                        sample.ttft_ms = (now - t0) * 1000.0
                    sample.events += n
                    sample.arrivals.extend([now] * n)
                    tail = buf[buf.rfind(b"\n\n") + 2 :]
                else:
                    tail = buf
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.ok, sample.error = False, type(exc).__name__
    if sample.events != chunks:
        sample.ok = False
        sample.error = sample.error or f"{sample.events} of {chunks} events"
    return sample


def gap_stats(samples: list[StreamSample], gap_ms: float) -> tuple[list[float], int]:
    """Each gap between consecutive events' deviation from ``gap_ms``, and how many gaps were
    coalesced: events that arrived < 1 ms apart although the upstream waited ``gap_ms``."""
    devs: list[float] = []
    coalesced = 0
    for s in samples:
        for a, b in zip(s.arrivals, s.arrivals[1:], strict=False):
            gap = (b - a) * 1000.0
            devs.append(abs(gap - gap_ms))
            if gap < 1.0:
                coalesced += 1
    return devs, coalesced


async def streams(
    base: str, concurrency: int, seconds: float, chunks: int, gap_ms: float
) -> list[StreamSample]:
    """``concurrency`` workers opening one stream after another for ``seconds``."""
    url = base + "/v1/chat/completions"
    out: list[StreamSample] = []
    loop = asyncio.get_running_loop()
    async with session(concurrency) as http:
        # One untimed stream per worker first: connections opened, code paths warm.
        await asyncio.gather(*(one_stream(http, url, 2, 1) for _ in range(concurrency)))
        t_end = loop.time() + seconds

        async def worker() -> None:
            while loop.time() < t_end:
                out.append(await one_stream(http, url, chunks, gap_ms))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


@dataclass
class HoldResult:
    opened: int
    completed: int
    errors: int
    error_kinds: dict[str, int]
    events_expected: int
    events_received: int
    peak_rss_mb: float
    seconds: float
    max_gap_ms: float


async def hold_streams(
    base: str,
    count: int,
    chunks: int,
    gap_ms: float,
    rss_mb: Callable[[], float],
    ramp_s: float = 2.0,
    body: bytes = STREAM_BODY,
) -> HoldResult:
    """Open ``count`` slow streams (spread over ``ramp_s``) and hold them all at once."""
    url = base + "/v1/chat/completions"
    peak = [rss_mb()]
    done = asyncio.Event()

    async def sample_rss() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            try:
                await asyncio.wait_for(done.wait(), 0.25)
            except TimeoutError:
                pass

    async with session(0) as http:
        sampler = asyncio.get_running_loop().create_task(sample_rss())
        t0 = time.perf_counter()

        async def start(i: int) -> StreamSample:
            await asyncio.sleep(ramp_s * i / count)
            return await one_stream(http, url, chunks, gap_ms, body)

        samples = await asyncio.gather(*(start(i) for i in range(count)))
        elapsed = time.perf_counter() - t0
        done.set()
        await sampler
    kinds: dict[str, int] = {}
    max_gap = 0.0
    for s in samples:
        if not s.ok:
            kinds[s.error] = kinds.get(s.error, 0) + 1
        for a, b in zip(s.arrivals, s.arrivals[1:], strict=False):
            max_gap = max(max_gap, (b - a) * 1000.0)
    return HoldResult(
        opened=count,
        completed=sum(1 for s in samples if s.ok),
        errors=sum(1 for s in samples if not s.ok),
        error_kinds=kinds,
        events_expected=count * chunks,
        events_received=sum(s.events for s in samples),
        peak_rss_mb=peak[0],
        seconds=elapsed,
        max_gap_ms=max_gap,
    )
