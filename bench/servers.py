"""``python -m bench servers``: which ASGI server, and how far hal0web is from a bare proxy.

Issue 23 asks to choose the server by measurement, with hal0web held to a minimal
Starlette + aiohttp proxy (bench/minimal.py). In one run, every cell interleaved round by
round (the order rotates each round, so no server always follows the same one):

- ``direct``: the load generator talking to the fake upstream itself;
- ``minimal-uvicorn``: the minimal proxy under hal0web's own Uvicorn command line
  (dispatch/management/commands/serve.py ``server_command``, app ``bench.minimal:app``);
- ``hal0web-uvicorn``: hal0web as ``make run`` serves it (httptools, uvloop);
- ``hal0web-granian`` and ``minimal-granian``: the same two apps under Granian (ASGI
  interface, lifespan on, one worker, one runtime thread, uvloop, HTTP/1, WebSockets on).

The harness is bench/__main__.py's: the fake upstream and this driver (the load generator,
closed loop, bench/load.py) on core 0, each server on core 1 with one worker, its CPU time
read from /proc for its whole process tree (Granian runs its worker as a child process).
After the cells, each hal0web opens the page's live feed (``/ws/dispatch/``) as a logged-in
staff user from its own origin and hears one request's decision: the server must carry
Channels' WebSocket, not only HTTP. The report goes to ``bench/results/servers.md``.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

import orjson
import websockets

from bench import load
from bench.__main__ import (
    Cell,
    Report,
    Target,
    _loadavg,
    _spread,
    cell,
    fmt,
    pct,
    signed,
    versions,
)
from bench.procs import (
    BIN,
    HAL0_CORE,
    LOAD_CORE,
    PY,
    ROOT,
    Proc,
    Workspace,
    affinity,
    fake_proc,
    free_port,
    tree_pids,
)

CELL_S = 5.0  # issue 23's harness: 5 s cells (after load.closed_loop's 0.5 s warm-up)
ROUNDS = 3
CONCURRENCY = (1, 16, 64)  # every one in every round: the targets are set at all three
STREAM_GAP_MS = 10.0
# At 1 concurrent shorter streams give more first tokens per second of run; at 16 the same
# 20-event streams as `python -m bench`. Both count coalesced gaps.
STREAM_CELLS = ((1, 8, 4.0), (16, 20, 3.0))  # (concurrency, events per stream, seconds)
HAL0_APP = "hal0web.asgi:application"
MINIMAL_APP = "bench.minimal:app"
YARDSTICK = "minimal-uvicorn"
PROD = "hal0web-uvicorn"
# The targets table's columns: hal0web first (the targets are its), the yardsticks after.
COLUMNS = (PROD, "hal0web-granian", YARDSTICK, "minimal-granian")


def granian_argv(app: str, port: int) -> list[str]:
    """Granian as close to hal0web's Uvicorn line as it goes: one worker, uvloop, HTTP/1 only,
    a 4,096 backlog, no access log. WebSockets stay on (the live feed needs them) and the
    ``asgi`` interface sends lifespan events (``asginl`` would not)."""
    return [
        str(BIN / "granian"),
        "--interface",
        "asgi",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--runtime-threads",
        "1",
        "--loop",
        "uvloop",
        "--http",
        "1",
        "--backlog",
        "4096",
        "--no-access-log",
        "--log-level",
        "warning",
        app,
    ]


def uvicorn_argv(app: str, port: int) -> list[str]:
    from dispatch.management.commands.serve import server_command

    argv = server_command("uvicorn", "127.0.0.1", port, access_log=None)
    argv[argv.index(HAL0_APP)] = app
    return argv


def _servers(ws: Workspace, upstream: str) -> list[Proc]:
    out = []
    for name in ("minimal-uvicorn", "hal0web-uvicorn", "hal0web-granian", "minimal-granian"):
        app_name, server = name.split("-")
        app = HAL0_APP if app_name == "hal0web" else MINIMAL_APP
        port = free_port()
        argv = uvicorn_argv(app, port) if server == "uvicorn" else granian_argv(app, port)
        if app_name == "hal0web":
            proc = ws.server(name, argv, port)  # its own copy of the database
        else:
            proc = ws.proc(name, argv, HAL0_CORE, port)
            proc.extra_env["BENCH_UPSTREAM"] = upstream
        out.append(proc)
    return out


def wait_answers(proc: Proc, timeout: float = 60.0) -> None:
    """Until a chat completion through ``proc`` answers 200: the whole chain is up (the
    minimal proxy has no GET route to poll, and hal0web's slot must be ready)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.popen is not None and proc.popen.poll() is not None:
            break
        req = urllib.request.Request(
            proc.base + "/v1/chat/completions", data=load.BODY, headers=load.JSON_HEADERS
        )
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.HTTPError) as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} did not come up ({last}); log:\n{proc.log_tail()}")


def staff_cookie(ws: Workspace) -> str:
    """A logged-in staff user's session in the workspace's database (copied to each hal0web
    when it starts): the Cookie header the live page would send."""
    code = (
        "from django.contrib.auth import get_user_model; from django.test import Client; "
        "u = get_user_model().objects.create_user('bench', password='not-a-real-password', "
        "is_staff=True); c = Client(); c.force_login(u); print(c.cookies['sessionid'].value)"
    )
    out = subprocess.run(
        [PY, "manage.py", "shell", "-c", code],
        env=ws.env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return "sessionid=" + out.stdout.strip().splitlines()[-1]


# --- measuring --------------------------------------------------------------------------


def _rotated(targets: list[Target], rnd: int) -> list[Target]:
    k = rnd % len(targets)
    return targets[k:] + targets[:k]


Cells = dict[tuple[str, int], list[Cell]]


async def non_streaming(targets: list[Target]) -> Cells:
    cells: Cells = {}
    for t in targets:  # untimed: imports done, pools opened, code paths warm
        await load.closed_loop(t.base, 16, 1.0, warmup_s=0.0)
    for rnd in range(ROUNDS):
        for conc in CONCURRENCY:
            for t in _rotated(targets, rnd):
                cells.setdefault((t.name, conc), []).append(await cell(t, conc, CELL_S))
    return cells


@dataclass
class Streamed:
    streams: int
    ttft_p50: float
    ttft_p99: float
    dev_p50: float
    dev_p99: float
    incomplete: int
    coalesced: int
    gaps: int
    cpu_ms: float


async def stream_cell(t: Target, conc: int, chunks: int, seconds: float) -> Streamed:
    cpu0 = t.proc.cpu_s() if t.proc else 0.0
    samples = await load.streams(t.base, conc, seconds, chunks, STREAM_GAP_MS)
    cpu1 = t.proc.cpu_s() if t.proc else 0.0
    ttfts = [s.ttft_ms for s in samples if s.events]
    devs, coalesced = load.gap_stats(samples, STREAM_GAP_MS)
    return Streamed(
        len(samples),
        pct(ttfts, 0.5),
        pct(ttfts, 0.99),
        pct(devs, 0.5),
        pct(devs, 0.99),
        sum(1 for s in samples if not s.ok),
        coalesced,
        len(devs),
        # load.streams' untimed warm-up streams (one per worker) are served too
        (cpu1 - cpu0) * 1000 / (len(samples) + conc) if t.proc else float("nan"),
    )


async def streaming(targets: list[Target]) -> dict[tuple[str, int], Streamed]:
    out: dict[tuple[str, int], Streamed] = {}
    for i, (conc, chunks, seconds) in enumerate(STREAM_CELLS):
        for t in _rotated(targets, i):
            out[(t.name, conc)] = await stream_cell(t, conc, chunks, seconds)
    return out


@dataclass
class FeedCheck:
    ok: bool
    text: str


async def feed_check(proc: Proc, cookie: str) -> FeedCheck:
    """The live page's WebSocket under ``proc``: from its own origin it opens, sends the
    snapshot and then the decision of a request made meanwhile; from another origin it is
    refused (dispatch/web/ws_origin.py)."""
    url = f"ws://127.0.0.1:{proc.port}/ws/dispatch/"
    heard: list[str] = []
    try:
        async with asyncio.timeout(15):
            headers = {"Cookie": cookie, "Origin": proc.base}
            async with websockets.connect(url, additional_headers=headers) as ws:
                first = orjson.loads(await ws.recv())
                heard.append(str(first.get("type")))
                async with load.session() as http:
                    post = http.post(
                        proc.base + "/v1/chat/completions",
                        data=load.BODY,
                        headers=load.JSON_HEADERS,
                    )
                    async with post as resp:
                        await resp.read()
                while "dispatch.decision" not in heard:
                    # The page hears its events in batches, one frame per tick (dispatch/web/live.py).
                    frame = orjson.loads(await ws.recv())
                    batch = frame.get("events", []) if frame.get("type") == "batch" else [frame]
                    heard.extend(str(event.get("type")) for event in batch)
    except Exception as exc:  # whatever went wrong is the finding: report it as is
        return FeedCheck(
            False,
            f"FAILED after hearing {heard or 'nothing'}: {type(exc).__name__}: {exc}; "
            f"log tail: {proc.log_tail(600)!r}",
        )
    refused = await _refused_from_elsewhere(url, cookie)
    ok = heard[0] == "snapshot" and refused.startswith("refused")
    return FeedCheck(
        ok,
        f"opened from its own origin, heard {' -> '.join(heard)}; from another origin "
        f"(http://127.0.0.1:1): {refused}",
    )


async def _refused_from_elsewhere(url: str, cookie: str) -> str:
    headers = {"Cookie": cookie, "Origin": "http://127.0.0.1:1"}
    try:
        async with asyncio.timeout(10):
            async with websockets.connect(url, additional_headers=headers) as ws:
                await ws.recv()
    except websockets.InvalidStatus as exc:
        return f"refused (HTTP {exc.response.status_code})"
    except websockets.ConnectionClosed as exc:
        return f"refused (closed, code {exc.rcvd.code if exc.rcvd else '-'})"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
    return "OPENED (it should not)"


# --- the report -------------------------------------------------------------------------


def _median(cs: list[Cell], attr: str) -> float:
    return statistics.median(getattr(c, attr) for c in cs)


def _paired(cells: Cells, a: str, b: str, conc: int, f: Callable[[Cell, Cell], float]) -> float:
    """The median over rounds of ``f(a's cell, b's cell)`` taken in the same round: drift
    between rounds cancels out of a difference or a ratio."""
    return statistics.median(
        f(x, y) for x, y in zip(cells[(a, conc)], cells[(b, conc)], strict=True)
    )


def _added_p50(cells: Cells, name: str, conc: int) -> float:
    return _paired(cells, name, "direct", conc, lambda x, y: x.p50 - y.p50)


def _ratio_rps(cells: Cells, a: str, b: str, conc: int) -> float:
    return _paired(cells, a, b, conc, lambda x, y: x.rps / y.rps if y.rps else float("nan"))


def _tail(cells: Cells, name: str, conc: int) -> float:
    return statistics.median(c.p99 / c.p50 for c in cells[(name, conc)] if c.p50)


def cells_table(rep: Report, cells: Cells, targets: list[Target]) -> None:
    rows = []
    for conc in CONCURRENCY:
        n = len(cells[("direct", conc)])
        for t in targets:
            cs = cells[(t.name, conc)]
            is_direct = t.proc is None
            rows.append(
                [
                    t.name,
                    str(conc),
                    str(n),
                    fmt(_median(cs, "rps"), 0),
                    fmt(_ratio_rps(cells, t.name, "direct", conc)),
                    fmt(_ratio_rps(cells, t.name, YARDSTICK, conc)),
                    fmt(_median(cs, "p50"), 3),
                    fmt(_median(cs, "p99"), 3),
                    "" if is_direct else signed(_added_p50(cells, t.name, conc), 3),
                    fmt(_tail(cells, t.name, conc), 2),
                    str(sum(c.errors for c in cs)),
                    "" if is_direct else fmt(_median(cs, "cpu_ms"), 3),
                ]
            )
    rep.add(
        f"### Non-streaming chat completions ({CELL_S:g} s cells after a 0.5 s warm-up; "
        f"{ROUNDS} interleaved rounds at {', '.join(map(str, CONCURRENCY))} concurrent)",
        "",
        "Each figure is the median over the rounds; `x direct`, `x minimal-uvicorn` and `added "
        "p50` are the medians of the per-round ratios and differences (each round's cells "
        "were taken seconds apart, one after the other).",
        "",
    )
    rep.table(
        [
            "target",
            "conc",
            "rounds",
            "rps",
            "x direct",
            "x minimal-uvicorn",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "p99/p50",
            "errors",
            "CPU ms/req",
        ],
        rows,
    )
    rep.add(
        "CPU ms/req: user + system time of the server's whole process tree (/proc/PID/stat; "
        "Granian's supervisor and worker both) per answered request, warm-up included.",
        "",
    )
    noise = []
    for t in targets:
        runs = [c.rps for c in cells[(t.name, 16)]]
        noise.append(f"{t.name} " + " / ".join(fmt(x, 0) for x in runs) + f" ({_spread(runs)})")
    rep.add("Noise, rps at 16 concurrent round by round: " + "; ".join(noise) + ".", "")


def streams_table(
    rep: Report, streamed: dict[tuple[str, int], Streamed], targets: list[Target]
) -> None:
    rows = []
    for conc, chunks, seconds in STREAM_CELLS:
        d = streamed[("direct", conc)]
        for t in targets:
            s = streamed[(t.name, conc)]
            is_direct = t.proc is None
            rows.append(
                [
                    t.name,
                    f"{conc} ({chunks} events, {seconds:g} s)",
                    str(s.streams),
                    fmt(s.ttft_p50, 3),
                    "" if is_direct else signed(s.ttft_p50 - d.ttft_p50, 3),
                    fmt(s.ttft_p99, 3),
                    fmt(s.dev_p50),
                    fmt(s.dev_p99),
                    str(s.incomplete),
                    f"{s.coalesced} of {s.gaps}",
                    "" if is_direct else fmt(s.cpu_ms, 2),
                ]
            )
    rep.add(
        f"### Streaming (SSE, the fake sends an event every {STREAM_GAP_MS:g} ms, the first "
        "with the headers; one pass per target, interleaved)",
        "",
    )
    rep.table(
        [
            "target",
            "conc",
            "streams",
            "TTFT p50 ms",
            "TTFT added p50 ms",
            "TTFT p99 ms",
            "gap dev p50 ms",
            "gap dev p99 ms",
            "incomplete",
            "coalesced gaps (<1 ms)",
            "CPU ms/stream",
        ],
        rows,
    )


def targets_table(rep: Report, cells: Cells, streamed: dict[tuple[str, int], Streamed]) -> None:
    """Issue 23's wall-clock targets, for hal0web under each server and, for comparison, for
    the yardstick itself (which has none of hal0web's work to do)."""

    def yes(ok: bool) -> str:
        return "yes" if ok else "NO"

    def ratio(name: str) -> tuple[str, bool]:
        r = _ratio_rps(cells, name, YARDSTICK, 16)
        return f"{r:.3f}x", r >= 1.0

    def added(name: str) -> tuple[str, bool]:
        a = _added_p50(cells, name, 1)
        return f"{a:+.3f} ms", a <= 0.5

    def ttft(conc: int) -> Callable[[str], tuple[str, bool]]:
        def check(name: str) -> tuple[str, bool]:
            a = streamed[(name, conc)].ttft_p50 - streamed[("direct", conc)].ttft_p50
            return f"{a:+.3f} ms", a <= 0.5

        return check

    def tail(conc: int) -> Callable[[str], tuple[str, bool]]:
        def check(name: str) -> tuple[str, bool]:
            r = _tail(cells, name, conc)
            return f"{r:.3f}x", r <= 2.0

        return check

    def coalesced(name: str) -> tuple[str, bool]:
        n = sum(streamed[(name, c)].coalesced for c, _, _ in STREAM_CELLS)
        gaps = sum(streamed[(name, c)].gaps for c, _, _ in STREAM_CELLS)
        return f"{n} of {gaps}", n == 0

    checks: list[tuple[str, Callable[[str], tuple[str, bool]]]] = [
        ("C=16 rps >= 1.0x minimal-uvicorn (same round)", ratio),
        ("C=1 added p50 vs direct <= 0.5 ms", added),
        ("TTFT added p50 at C=1 <= 0.5 ms", ttft(1)),
        ("TTFT added p50 at C=16 <= 0.5 ms", ttft(16)),
        ("p99 <= 2x p50 at C=16", tail(16)),
        ("p99 <= 2x p50 at C=64", tail(64)),
        ("0 coalesced chunks (C=1 and C=16 streams)", coalesced),
    ]
    rows = []
    for label, check in checks:
        row = [label]
        for name in COLUMNS:
            value, ok = check(name)
            row += [value, yes(ok)]
        rows.append(row)
    rep.add("### Targets (issue 23, wall clock)", "")
    header = ["target"]
    for name in COLUMNS:
        header += [name, "holds"]
    rep.table(header, rows)
    same = _ratio_rps(cells, "hal0web-granian", "minimal-granian", 16)
    rep.add(
        f"The targets are hal0web's; the minimal proxy's columns show where the yardstick "
        f"itself stands. Under the same server: hal0web-granian / minimal-granian at C=16 = "
        f"{same:.2f}x; hal0web-granian / hal0web-uvicorn = "
        f"{_ratio_rps(cells, 'hal0web-granian', PROD, 16):.2f}x, minimal-granian / "
        f"minimal-uvicorn = {_ratio_rps(cells, 'minimal-granian', YARDSTICK, 16):.2f}x.",
        "",
    )
    # CPU per request counts only the server's own time: when other work on the machine
    # takes the server's core away, rps falls but this figure barely moves.
    base = _median(cells[(YARDSTICK, 16)], "cpu_ms")
    parts = []
    for name in COLUMNS:
        cpu = _median(cells[(name, 16)], "cpu_ms")
        parts.append(f"{name} {cpu:.3f} ({cpu / base:.2f}x)")
    rep.add(
        "The steadier figure on a shared machine, CPU ms per request at C=16 (x "
        f"{YARDSTICK}'s): " + ", ".join(parts) + ".",
        "",
    )


def header(rep: Report, started: float, servers: list[Proc], fake: Proc) -> None:
    extra = []
    for n in ("granian", "starlette", "websockets", "uvloop", "httptools"):
        try:
            extra.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    rep.add(
        "# ASGI servers: hal0web and the minimal proxy under Uvicorn and Granian",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))} "
        f"(`python -m bench servers`); {versions()}, {', '.join(extra)}.",
        "",
        f"Pinning (taskset): the fake upstream (pid {fake.pid}) and this driver, the load "
        f"generator (aiohttp client on uvloop, closed loop), on core {LOAD_CORE}; every server "
        f"on core {HAL0_CORE}, one worker, HAL0_LOG_LEVEL=WARNING, hal0web on its own copy of "
        "a SQLite database with one slot `bench` at the fake. Load average at start: "
        f"{_loadavg()}.",
        "",
    )
    rows = []
    for p in servers:
        pids = tree_pids(p.pid)
        rows.append(
            [
                p.name,
                ", ".join(f"{pid} (cores {affinity(pid)})" for pid in pids),
                "`" + " ".join(p.argv).replace(PY, "python").replace(f"{BIN}/", "") + "`",
            ]
        )
    rep.table(["server", "processes (allowed cores)", "command line"], rows)
    rep.add(
        f"The minimal proxy's BENCH_UPSTREAM is {fake.base}/v1 (bench/served.py's setting).",
        "",
    )


async def run() -> str:
    started = time.time()
    rep = Report()
    ws = Workspace()
    fake = fake_proc(ws)
    servers: list[Proc] = []
    try:
        fake.start()
        fake.wait_http("/v1/models")
        ws.setup(fake.port)
        cookie = staff_cookie(ws)
        servers = _servers(ws, fake.base + "/v1")
        for p in servers:
            p.start()
        for p in servers:
            wait_answers(p)
        header(rep, started, servers, fake)
        targets = [Target("direct", fake.base, None)] + [Target(p.name, p.base, p) for p in servers]
        cells = await non_streaming(targets)
        streamed = await streaming(targets)
        feeds = {p.name: await feed_check(p, cookie) for p in servers if p.name.startswith("hal0")}
        cells_table(rep, cells, targets)
        streams_table(rep, streamed, targets)
        rep.add("### The live page's WebSocket feed (/ws/dispatch/, Channels)", "")
        for name, check in feeds.items():
            rep.add(f"- {name}: {'works' if check.ok else '**does NOT work**'}: {check.text}")
        rep.add("")
        targets_table(rep, cells, streamed)
        exited = [p.name for p in servers if p.popen is not None and p.popen.poll() is not None]
        if exited:
            rep.add(f"**Exited during the run: {', '.join(exited)}.**", "")
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for p in [*servers, fake]:
            p.stop()
        ws.cleanup()
    return rep.text()
