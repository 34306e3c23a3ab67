"""The proxy seam alone, without Django: CPU per request of ``Upstream.open`` + ``read``.

``python -m bench seam``: the fake upstream on core 0; this process, the client, on core 1.
Compares httpx's own pool, the httpx-aiohttp transport and dispatch.upstream.pool.AiohttpTransport
(all behind ``Upstream``, i.e. httpx's API), and a bare aiohttp session (no httpx at all),
sequentially and at 16 and 64 concurrent, two interleaved rounds each.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time

import httpx
import httpx_aiohttp

from bench.load import BODY
from bench.procs import HAL0_CORE, Workspace, fake_proc

N = 3000
HEADERS = {"content-type": "application/json", "x-request-id": "bench", "accept": "*/*"}
LIMITS = httpx.Limits(max_connections=10_000, max_keepalive_connections=1000)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _measure(one, conc: int) -> tuple[float, float]:
    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    await worker(200)  # warm: connections open, code paths hot
    c0, t0 = _cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker(N // conc) for _ in range(conc)))
    return (_cpu_s() - c0) * 1e6 / N, N / (time.perf_counter() - t0)


async def run() -> str:
    import aiohttp

    from dispatch.routing.table import ModelEntry, make_slot
    from dispatch.upstream.client import Upstream

    ws = Workspace()
    fake = fake_proc(ws)
    fake.start()
    lines = [
        "# The proxy seam alone (no Django)",
        "",
        f"Fake upstream on core {fake.core}; this client process on core {HAL0_CORE}. "
        f"{N:,} requests per cell after 200 warm-up ones; CPU is this process's own.",
        "",
        "| client | conc | round | CPU µs/req | rps |",
        "|---|---|---|---|---|",
    ]
    try:
        fake.wait_http("/v1/models")
        os.sched_setaffinity(0, {HAL0_CORE})
        slot = make_slot(
            "bench", fake.base + "/v1", [ModelEntry("bench-model", "bench-model", "manifest")]
        )
        for conc in (1, 16, 64):
            for rnd in (1, 2):
                for name in ("httpx pool", "httpx-aiohttp", "AiohttpTransport", "bare aiohttp"):
                    if name == "bare aiohttp":
                        async with aiohttp.ClientSession() as session:
                            url = fake.base + "/v1/chat/completions"

                            async def bare(
                                s: aiohttp.ClientSession = session, url: str = url
                            ) -> None:
                                async with s.post(url, data=BODY, headers=HEADERS) as r:
                                    await r.read()

                            cpu, rps = await _measure(bare, conc)
                    else:
                        transport: httpx.AsyncBaseTransport | None = None
                        if name == "httpx pool":
                            transport = httpx.AsyncHTTPTransport(limits=LIMITS)
                        elif name == "httpx-aiohttp":
                            transport = httpx_aiohttp.AiohttpTransport(limits=LIMITS)
                        up = Upstream(transport)

                        async def seam(u: Upstream = up) -> None:
                            r = await u.open(slot, "chat/completions", BODY, HEADERS)
                            await r.read(2**26)

                        cpu, rps = await _measure(seam, conc)
                        await up.aclose()
                    lines.append(f"| {name} | {conc} | {rnd} | {cpu:,.0f} | {rps:,.0f} |")
    finally:
        fake.stop()
        ws.cleanup()
    return "\n".join(lines) + "\n"
