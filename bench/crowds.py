"""``python -m bench crowds``: many open pages against the /v1 path (issue 24, "crowds").

What the issue measured: 500 pages connecting at once got 298 HTTP 500s (redis-py's pool of
100 connections, exhausted); under ~53 decisions/s, 50 pages heard every decision, 100 pages
64-69 %, 500 pages 27 %; and the fan-out cost the /v1 load 25 % of its throughput. What
must hold: 1,000 pages connect at once without a 500, every page hears every decision, and
500 open pages cost the /v1 path at most 5 % of its throughput.

Set-up: the fake upstream, a Redis server of the bench's own (``redis-server`` on a free
port, nothing saved) and this driver on core 0; hal0web (one Uvicorn worker, the line of
``manage.py serve``, SQLite, ``REDIS_URL`` at that Redis) on core 1; the pages (websockets
clients, ``bench/crowd_pages.py``, logged in as staff, who hear every decision) in a process
of their own on core 0.

The load is the issue's: steady mixed traffic, closed loop, ``CONC`` workers each sending a
20-event stream (10 ms apart upstream) and then a plain chat completion, over and over:
about 65 requests/s, each a decision every staff page should hear. A cell is one load run of
``CELL_S`` seconds with 0, 50, 100 or 500 pages open; 0 and 500 interleave over ``ROUNDS``.
Throughput is the requests answered in the cell (the load is latency-bound, as the issue's
was: what the pages cost shows as slower answers, hence fewer); hal0web's CPU per request
is beside it. Delivery: after each cell the pages say which decisions they heard, by
request id, against the ids the load was answered with.

Then the storm: 1,000 pages open in the same instant, and each handshake's outcome counted.
The report goes to ``bench/results/crowds.md``. Variables ``CROWDS_NAME=value`` of the
driver's environment reach the hal0web process as ``NAME=value`` (another settings module,
say, to try another channel layer).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from bench import load
from bench.__main__ import Report, _loadavg, fmt, versions
from bench.procs import (
    CLK_TCK,
    HAL0_CORE,
    LOAD_CORE,
    PY,
    Proc,
    Workspace,
    _stat,
    fake_proc,
    free_port,
)

CONC = 8
CELL_S = 10.0
ROUNDS = 7
CROWD = 500
SMALL = (50, 100)
STORM = 1000
WAVE = 50
STREAM_CHUNKS = 20
STREAM_GAP_MS = 10.0
EXTRA_ENV = {k.removeprefix("CROWDS_"): v for k, v in os.environ.items() if k.startswith("CROWDS_")}
TRAILING_S = 1.5  # a decision is sent after its answer, batched: what the pages still hear
COOKIE_CODE = (
    "from django.contrib.auth import get_user_model; from django.test import Client; "
    "u = get_user_model().objects.create_user('crowd', password='not-a-real-password', "
    "is_staff=True); c = Client(); c.force_login(u); print(c.cookies['sessionid'].value)"
)


@dataclass
class LoadRun:
    answered: int = 0  # in the cell
    errors: int = 0
    ids: set[str] = field(default_factory=set)  # every answered request's id


async def mixed(base: str, conc: int, seconds: float) -> LoadRun:
    """``conc`` workers, each a stream then a plain completion, over and over."""
    url = base + "/v1/chat/completions"
    run = LoadRun()
    loop = asyncio.get_running_loop()
    stream_headers = {
        **load.JSON_HEADERS,
        "x-bench-chunks": str(STREAM_CHUNKS),
        "x-bench-gap-ms": str(STREAM_GAP_MS),
    }
    async with load.session(conc) as http:
        t_end = loop.time() + seconds

        async def one(body: bytes, headers: dict[str, str]) -> None:
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    rid = resp.headers.get("x-request-id")
                    if rid:
                        run.ids.add(rid)
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            if loop.time() <= t_end:
                run.answered += ok
                run.errors += not ok

        async def worker() -> None:
            while loop.time() < t_end:
                await one(load.STREAM_BODY, stream_headers)
                await one(load.BODY, load.JSON_HEADERS)

        await asyncio.gather(*(worker() for _ in range(conc)))
    return run


class Crowd:
    """The pages' process (bench/crowd_pages.py), one command and one answer at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, server: Proc, cookie: str) -> Crowd:
        proc = await asyncio.create_subprocess_exec(
            "taskset",
            "-c",
            str(LOAD_CORE),
            PY,
            "-m",
            "bench.crowd_pages",
            "127.0.0.1",
            str(server.port),
            cookie,
            server.base,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 28,  # a report holds every page's request ids
        )
        return cls(proc)

    def cpu_s(self) -> float:
        stat = _stat(self.proc.pid)
        return (int(stat[11]) + int(stat[12])) / CLK_TCK if stat else float("nan")

    async def ask(self, line: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        answer = await self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the pages' process ended (asked {line!r})")
        return orjson.loads(answer)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@dataclass
class Cell:
    pages: int
    answered: int
    errors: int
    seconds: float
    cpu_s: float
    redis_cpu_s: float
    pages_cpu_s: float
    heard: list[float]  # per page: the share of the answered requests' decisions it heard
    missed: list[int]  # per page: what the server told it it had missed
    frames: list[int]
    closed: int  # pages whose socket closed during the cell
    sent: int  # decisions there were to hear

    @property
    def rps(self) -> float:
        return self.answered / self.seconds

    @property
    def cpu_ms_per_req(self) -> float:
        return self.cpu_s * 1000 / self.answered if self.answered else float("nan")


async def cell(server: Proc, redis: Proc, crowd: Crowd, pages: int) -> Cell:
    await crowd.ask("close")
    # In waves (the storm is measured apart): the cell is about pages that are open.
    have, tries = 0, 0
    while have < pages:
        opened = await crowd.ask(f"open {min(WAVE, pages - have)}")
        have, tries = opened["open"], tries + 1
        if tries > 5 * pages / WAVE:
            raise RuntimeError(f"{pages} pages did not open: {opened['outcomes']}")
    await asyncio.sleep(1.0)  # what opening cost is not the cell's
    await crowd.ask("reset")
    cpu0, rcpu0, pcpu0 = server.cpu_s(), redis.cpu_s(), crowd.cpu_s()
    t0 = time.monotonic()
    run = await mixed(server.base, CONC, CELL_S)
    seconds = min(CELL_S, time.monotonic() - t0)
    cpu1, rcpu1, pcpu1 = server.cpu_s(), redis.cpu_s(), crowd.cpu_s()
    await asyncio.sleep(TRAILING_S)
    report = await crowd.ask("report")
    sent = run.ids
    heard = [len(sent.intersection(ids)) / len(sent) for ids in report["pages"]] if sent else []
    return Cell(
        pages,
        run.answered,
        run.errors,
        seconds,
        cpu1 - cpu0,
        rcpu1 - rcpu0,
        pcpu1 - pcpu0,
        heard,
        report["missed"],
        report["frames"],
        report["closed"],
        len(sent),
    )


def redis_proc(ws: Workspace) -> Proc:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    argv += ["--bind", "127.0.0.1", "--maxclients", "10000"]
    return ws.proc("redis", argv, LOAD_CORE, port)


def wait_redis(proc: Proc, timeout: float = 20) -> None:
    import redis as redis_py

    client = redis_py.Redis(port=proc.port)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis_py.ConnectionError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not come up:\n" + proc.log_tail()) from exc
                time.sleep(0.1)
    finally:
        client.close()


async def run() -> str:
    from dispatch.management.commands.serve import server_command

    started = time.time()
    rep = Report()
    ws = Workspace()
    fake = fake_proc(ws)
    redis = redis_proc(ws)
    server: Proc | None = None
    crowd: Crowd | None = None
    try:
        fake.start()
        redis.start()
        fake.wait_http("/v1/models")
        wait_redis(redis)
        ws.setup(fake.port)
        cookie = "sessionid=" + _manage_out(ws, COOKIE_CODE)
        port = free_port()
        server = ws.server("hal0web", server_command("uvicorn", "127.0.0.1", port, None), port)
        server.extra_env["REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
        server.extra_env.update(EXTRA_ENV)
        server.start()
        server.wait_http("/v1/models")
        await mixed(server.base, CONC, 2.0)  # warm: connections opened, code paths run
        crowd = await Crowd.start(server, cookie)
        storm = await crowd.ask(f"open {STORM}")
        await crowd.ask("close")
        cells: list[Cell] = []
        order = [0, CROWD]
        for rnd in range(ROUNDS):
            for pages in order if rnd % 2 == 0 else order[::-1]:
                cells.append(await cell(server, redis, crowd, pages))
        for pages in SMALL:
            cells.append(await cell(server, redis, crowd, pages))
        storm_again = await crowd.ask(f"open {STORM}")
        await crowd.ask("close")
        _report(rep, started, server, cells, storm, storm_again)
    finally:
        if crowd is not None:
            await crowd.stop()
        if server is not None:
            server.stop()
        redis.stop()
        fake.stop()
        ws.cleanup()
    return rep.text()


def _manage_out(ws: Workspace, code: str) -> str:
    from bench.procs import ROOT

    done = subprocess.run(
        [PY, "manage.py", "shell", "-c", code],
        env=ws.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def _storm_text(storm: dict[str, Any]) -> str:
    outcomes = ", ".join(f"{k}: {v}" for k, v in sorted(storm["outcomes"].items()))
    return f"{outcomes} (all answered in {storm['seconds']:.1f} s)"


def _report(
    rep: Report,
    started: float,
    server: Proc,
    cells: list[Cell],
    storm: dict[str, Any],
    storm_again: dict[str, Any],
) -> None:
    rep.add(
        "# hal0web: crowds of pages (issue 24)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))} "
        f"(`python -m bench crowds`); {versions()}. Load average at start: {_loadavg()}.",
        "",
        f"hal0web: one Uvicorn worker on core {HAL0_CORE} (SQLite, Redis channel layer); the "
        f"fake upstream, a Redis of the bench's own, the load generator and the pages' process "
        f"on core {LOAD_CORE}. Load: {CONC} closed-loop workers, each a {STREAM_CHUNKS}-event "
        f"stream ({STREAM_GAP_MS:g} ms apart) then a plain completion; {CELL_S:g} s cells. "
        "Pages are staff's: they hear every decision.",
        "",
        f"**{STORM} pages connecting at once**: {_storm_text(storm)}; again after the load "
        f"cells: {_storm_text(storm_again)}.",
        "",
    )
    rows = []
    for c in cells:
        whole = sum(1 for h in c.heard if h >= 1.0)
        rows.append(
            [
                str(c.pages),
                str(c.answered),
                fmt(c.rps, 1),
                str(c.errors),
                fmt(c.cpu_s / c.seconds, 2),
                fmt(c.cpu_ms_per_req, 2),
                fmt(c.redis_cpu_s / c.seconds, 2),
                fmt(c.pages_cpu_s / c.seconds, 2),
                str(c.sent),
                (f"{whole} / {c.pages}" if c.pages else "-"),
                (fmt(100 * min(c.heard), 1) if c.heard else "-"),
                (fmt(100 * statistics.median(c.heard), 1) if c.heard else "-"),
                (str(max(c.missed)) if c.missed else "-"),
                (fmt(statistics.median(c.frames) / c.seconds, 1) if c.frames else "-"),
                str(c.closed),
            ]
        )
    rep.table(
        [
            "pages",
            "answered",
            "rps",
            "errors",
            "hal0web cores",
            "hal0web CPU ms/req",
            "Redis cores",
            "pages' cores",
            "decisions",
            "pages that heard all",
            "least heard %",
            "median heard %",
            "most missed (told)",
            "frames/s per page",
            "pages closed",
        ],
        rows,
    )
    base = [c for c in cells if c.pages == 0]
    crowd = [c for c in cells if c.pages == CROWD]
    if base and crowd:
        ratio = statistics.median(c.answered for c in crowd) / statistics.median(
            c.answered for c in base
        )
        cpu = statistics.median(c.cpu_ms_per_req for c in crowd) / statistics.median(
            c.cpu_ms_per_req for c in base
        )
        per_round = [b.answered / a.answered for a, b in zip(base, crowd, strict=False)]
        rep.add(
            f"**{CROWD} pages against none**: requests answered {ratio:.3f}x (medians; per "
            "round " + ", ".join(f"{x:.3f}" for x in per_round) + f"), so a cost of "
            f"{100 * (1 - ratio):.1f} %; hal0web's CPU per request {cpu:.2f}x. Load average "
            f"at end {_loadavg()}; total {time.time() - started:.0f} s.",
            "",
        )
