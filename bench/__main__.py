"""``python -m bench``: hal0web side by side with direct access to a fast fake upstream.

Starts, in subprocesses, the fake upstream (core 0, shared with this driver, which is the
load generator) and hal0web under Daphne and under Uvicorn (core 1, one worker each), then
measures every cell interleaved in one run: direct -> fake, Daphne -> fake, Uvicorn -> fake.
Prints a markdown report and writes it to ``bench/results/latest.md``.

``python -m bench transports`` compares the proxy's transports instead (httpx's own pool vs
the httpx-aiohttp transport vs ours), each behind the seam in hal0web under Uvicorn;
``python -m bench seam`` measures the seam alone, without Django (bench/seam.py);
``python -m bench cost`` compares metrics and the request log on vs off (bench/cost.py);
``python -m bench commits REV`` compares this tree with another commit (bench/commits.py),
and ``python -m bench instructions REV`` does in instructions per request, which do not
swing (bench/instructions.py, under callgrind); ``python -m bench models`` measures models on
demand in front of llama.cpp's own router (bench/models.py); ``python -m bench servers``
sets Uvicorn against Granian, hal0web against the minimal proxy (bench/servers.py), and
``python -m bench workers`` two workers against one on PostgreSQL + Redis (bench/workers.py),
``python -m bench crowds`` hundreds of open pages against the /v1 path (bench/crowds.py).
``python -m bench served`` counts instructions per request of the whole server process
against the minimal Starlette + aiohttp proxy (bench/served.py), and ``python -m bench
objects`` what Django's request and response cost one /v1 request (bench/objects.py), ``python -m bench
breakdown`` says which part of a request takes what share of its time (bench/breakdown.py).
``python -m bench probes`` measures writing the watcher's first round over 200 slots of 20
models, one result at a time against batched, on SQLite and PostgreSQL (bench/probes.py).
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import uvloop

from bench import load, resolver
from bench.procs import (
    HAL0_CORE,
    LOAD_CORE,
    Proc,
    Workspace,
    daphne_proc,
    fake_proc,
    floor_proc,
    uvicorn_proc,
    variant_proc,
)

RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 285.0  # the whole run, set-up included, stays under five minutes

CONCURRENCY = (1, 16, 64)
KEY_CONC = 16
KEY_ROUNDS = 3
CELL_S = 2.5
STREAM_CHUNKS = 20
STREAM_GAP_MS = 10.0
STREAM_CONC = 16
STREAM_S = 3.0
HOLD_STREAMS = 2000
HOLD_CHUNKS = 30
HOLD_GAP_MS = 100.0
GROWTH_REQUESTS = 50_000
GROWTH_WARMUP = 3_000
GROWTH_CONC = 16


@dataclass
class Target:
    name: str
    base: str
    proc: Proc | None  # None: the fake itself (direct)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def fmt(x: float, nd: int = 2) -> str:
    if x != x:  # NaN
        return "-"
    return f"{x:,.{nd}f}"


def signed(x: float, nd: int = 2) -> str:
    return "-" if x != x else f"{x:+,.{nd}f}"


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(row) + " |")
        self.add("")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def versions() -> str:
    names = ["django", "channels", "daphne", "uvicorn", "httpx", "aiohttp", "httpx-aiohttp"]
    parts = []
    for n in names:
        try:
            parts.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return f"Python {platform.python_version()}; " + ", ".join(parts)


def transport_name() -> str:
    from dispatch.upstream import pool

    if hasattr(pool, "AiohttpTransport"):
        return "aiohttp's pool behind httpx's API (dispatch.upstream.pool.AiohttpTransport)"
    return "httpx's own pool"


# --- phases --------------------------------------------------------------------------------


@dataclass
class Cell:
    target: str
    conc: int
    rps: float
    p50: float
    p99: float
    errors: int
    cpu_ms: float


async def cell(t: Target, conc: int, seconds: float = CELL_S) -> Cell:
    cpu0 = t.proc.cpu_s() if t.proc else 0.0
    r = await load.closed_loop(t.base, conc, seconds)
    cpu1 = t.proc.cpu_s() if t.proc else 0.0
    cpu_ms = (cpu1 - cpu0) * 1000 / r.total if t.proc and r.total else float("nan")
    return Cell(
        t.name, conc, r.rps, pct(r.latencies_ms, 0.5), pct(r.latencies_ms, 0.99), r.errors, cpu_ms
    )


async def non_streaming(targets: list[Target], rep: Report, rounds: int = KEY_ROUNDS) -> dict:
    cells: dict[tuple[str, int], list[Cell]] = {}
    for rnd in range(rounds):
        for conc in CONCURRENCY if rnd == 0 else (KEY_CONC,):
            for t in targets:
                c = await cell(t, conc)
                cells.setdefault((t.name, conc), []).append(c)
    direct = targets[0].name
    rows = []
    for conc in CONCURRENCY:
        d = _median_cell(cells[(direct, conc)])
        for t in targets:
            c = _median_cell(cells[(t.name, conc)])
            is_direct = t.name == direct
            rows.append(
                [
                    t.name,
                    str(conc),
                    fmt(c.rps, 0),
                    fmt(c.rps / d.rps) if d.rps else "-",
                    fmt(c.p50),
                    fmt(c.p99),
                    "" if is_direct else signed(c.p50 - d.p50),
                    "" if is_direct else signed(c.p99 - d.p99),
                    fmt(c.p99 / c.p50, 1) if c.p50 else "-",
                    str(c.errors),
                    "" if is_direct else fmt(c.cpu_ms, 3),
                    "" if is_direct or not c.cpu_ms else fmt(1000 / c.cpu_ms, 0),
                ]
            )
    rep.add(
        f"### Non-streaming chat completions ({CELL_S:g} s per cell after 0.5 s warm-up; "
        f"the {KEY_CONC}-concurrent cells are the median of {rounds} interleaved rounds)",
        "",
    )
    rep.table(
        [
            "target",
            "conc",
            "rps",
            "x direct",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "added p99 ms",
            "p99/p50",
            "errors",
            "CPU ms/req",
            "rps per core-second",
        ],
        rows,
    )
    rep.add(
        "CPU ms/req is the hal0web process's own user+system time (/proc/PID/stat) per "
        "answered request; `rps per core-second` (1000 / CPU ms) is what one worker could "
        "answer with a core to itself, a figure less sensitive to other load on the machine.",
        "",
    )
    noise = []
    for t in targets:
        runs = [c.rps for c in cells[(t.name, KEY_CONC)]]
        noise.append(
            f"{t.name}: " + " / ".join(fmt(x, 0) for x in runs) + f" (spread {_spread(runs)})"
        )
    rep.add(f"Noise, rps at {KEY_CONC} concurrent in each round: " + "; ".join(noise) + ".", "")
    return cells


def _median_cell(cs: list[Cell]) -> Cell:
    return sorted(cs, key=lambda c: c.rps)[len(cs) // 2]


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    mean = statistics.fmean(values)
    return f"±{(max(values) - min(values)) / 2 / mean * 100:.1f} %"


@dataclass
class StreamStats:
    target: str
    streams: int
    ttft_p50: float
    ttft_p99: float
    dev_p50: float
    dev_p99: float
    events_mean: float
    incomplete: int
    coalesced: int
    gaps: int
    cpu_ms: float


async def streaming(targets: list[Target], rep: Report) -> dict[str, StreamStats]:
    stats: dict[str, StreamStats] = {}
    for t in targets:
        cpu0 = t.proc.cpu_s() if t.proc else 0.0
        samples = await load.streams(t.base, STREAM_CONC, STREAM_S, STREAM_CHUNKS, STREAM_GAP_MS)
        cpu1 = t.proc.cpu_s() if t.proc else 0.0
        ttfts = [s.ttft_ms for s in samples if s.events]
        devs, coalesced = load.gap_stats(samples, STREAM_GAP_MS)
        gaps = len(devs)
        stats[t.name] = StreamStats(
            t.name,
            len(samples),
            pct(ttfts, 0.5),
            pct(ttfts, 0.99),
            pct(devs, 0.5),
            pct(devs, 0.99),
            statistics.fmean(s.events for s in samples) if samples else 0.0,
            sum(1 for s in samples if not s.ok),
            coalesced,
            gaps,
            # the untimed warm-up streams (one per worker) count too
            (cpu1 - cpu0) * 1000 / (len(samples) + STREAM_CONC) if t.proc else float("nan"),
        )
    d = stats[targets[0].name]
    rows = []
    for t in targets:
        st = stats[t.name]
        is_direct = t.name == targets[0].name
        rows.append(
            [
                t.name,
                str(st.streams),
                fmt(st.ttft_p50),
                "" if is_direct else signed(st.ttft_p50 - d.ttft_p50),
                fmt(st.ttft_p99),
                fmt(st.dev_p50),
                fmt(st.dev_p99),
                f"{st.events_mean:.2f} / {STREAM_CHUNKS}",
                str(st.incomplete),
                f"{st.coalesced} of {st.gaps}",
                "" if is_direct else fmt(st.cpu_ms, 2),
            ]
        )
    rep.add(
        f"### Streaming at {STREAM_CONC} concurrent ({STREAM_CHUNKS} SSE events per stream, "
        f"upstream gap {STREAM_GAP_MS:g} ms, {STREAM_S:g} s per target)",
        "",
    )
    rep.table(
        [
            "target",
            "streams",
            "TTFT p50 ms",
            "TTFT added p50 ms",
            "TTFT p99 ms",
            "gap dev p50 ms",
            "gap dev p99 ms",
            "events/stream (sent)",
            "incomplete",
            "coalesced gaps (<1 ms)",
            "CPU ms/stream",
        ],
        rows,
    )
    return stats


async def hold(
    servers: list[Target], rep: Report, count: int, prompt_kb: float | None = None
) -> dict[str, load.HoldResult]:
    out: dict[str, load.HoldResult] = {}
    rows = []
    body = load.STREAM_BODY if prompt_kb is None else load.stream_body(prompt_kb)
    for t in servers:
        assert t.proc is not None
        before = t.proc.rss_mb()
        r = await load.hold_streams(
            t.base, count, HOLD_CHUNKS, HOLD_GAP_MS, t.proc.rss_mb, body=body
        )
        out[t.name] = r
        await asyncio.sleep(1.0)  # let the server let go of the streams
        per_stream_kb = (r.peak_rss_mb - before) * 1000 / count
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r.error_kinds.items())) or "-"
        rows.append(
            [
                t.name,
                str(r.opened),
                str(r.completed),
                f"{r.errors} ({kinds})",
                f"{r.events_received:,} / {r.events_expected:,}",
                fmt(before, 1),
                fmt(r.peak_rss_mb, 1),
                fmt(per_stream_kb, 1),
                fmt(r.seconds, 1),
                fmt(r.max_gap_ms, 0),
            ]
        )
    rep.add(
        f"### {count:,} concurrent slow streams on one worker (one event every "
        f"{HOLD_GAP_MS:g} ms, {HOLD_CHUNKS} events = {HOLD_CHUNKS * HOLD_GAP_MS / 1000:g} s each, "
        f"opened over 2 s; request body {len(body):,} bytes)",
        "",
    )
    rep.table(
        [
            "server",
            "streams",
            "completed",
            "errors",
            "events received / sent",
            "RSS before MB",
            "peak RSS MB",
            "RSS per stream KB",
            "wall s (ideal ~5)",
            "max event gap ms",
        ],
        rows,
    )
    return out


async def growth(
    servers: list[Target], rep: Report, deadline: float
) -> dict[str, tuple[int, float, float]]:
    out: dict[str, tuple[int, float, float]] = {}
    rows = []
    notes = []
    for i, t in enumerate(servers):
        assert t.proc is not None
        warm = await load.fixed_count(t.base, GROWTH_CONC, GROWTH_WARMUP)
        rps = warm.rps or 1.0
        remaining = deadline - time.monotonic()
        # Share what is left of the budget among the servers still to run.
        share = remaining / (len(servers) - i) - 2.0
        n = min(GROWTH_REQUESTS, max(2000, int(share * rps * 0.9)))
        if n < GROWTH_REQUESTS:
            notes.append(
                f"{t.name}: shortened to {n:,} requests (of {GROWTH_REQUESTS:,}) to keep "
                f"the run under five minutes at ~{rps:,.0f} rps"
            )
        rss0 = t.proc.rss_mb()
        r = await load.fixed_count(t.base, GROWTH_CONC, n)
        rss1 = t.proc.rss_mb()
        out[t.name] = (n, rss0, rss1)
        rows.append(
            [
                t.name,
                f"{r.requests:,}",
                str(r.errors),
                fmt(r.rps, 0),
                fmt(rss0, 1),
                fmt(rss1, 1),
                signed(rss1 - rss0, 1),
            ]
        )
    rep.add(
        f"### RSS growth after a {GROWTH_WARMUP:,}-request warm-up "
        f"(non-streaming, {GROWTH_CONC} concurrent)",
        "",
    )
    rep.table(
        [
            "server",
            "requests",
            "errors",
            "rps",
            "RSS after warm-up MB",
            "RSS after MB",
            "growth MB",
        ],
        rows,
    )
    if notes:
        rep.add("Honest note: " + "; ".join(notes) + ".", "")
    return out


def resolver_section(rep: Report) -> list[resolver.ResolverResult]:
    results = resolver.run()
    rep.add(
        f"### Resolver: dispatch.routing.resolver.resolve over {resolver.SLOTS} slots x "
        f"{resolver.MODELS_PER_SLOT} models (in-process, time.perf_counter_ns per call)",
        "",
    )
    rep.table(
        ["ids", "calls", "p50 µs", "p99 µs", "max µs"],
        [[r.kind, f"{r.calls:,}", fmt(r.p50_us), fmt(r.p99_us), fmt(r.max_us, 1)] for r in results],
    )
    rep.add(
        '`miss` includes building the "did you mean" suggestions (difflib over every known '
        "id); the target applies to resolving ids that exist.",
        "",
    )
    return results


# --- runs --------------------------------------------------------------------------------


def _check(rows: list[list[str]], name: str, value: str, ok: bool) -> None:
    rows.append([name, value, "yes" if ok else "**no**"])


def targets_section(
    rep: Report,
    cells: dict,
    streams: dict[str, StreamStats],
    held: dict[str, load.HoldResult],
    grown: dict[str, tuple[int, float, float]],
    res: list[resolver.ResolverResult],
    prod: str,
) -> None:
    rows: list[list[str]] = []

    def med(name: str, conc: int) -> Cell:
        return _median_cell(cells[(name, conc)])

    for server, floor in ((prod, 1000.0), ("daphne", 700.0)):
        if (server, KEY_CONC) in cells:
            c = med(server, KEY_CONC)
            _check(rows, f"{server}: rps at 16 ≥ {floor:,.0f}", fmt(c.rps, 0), c.rps >= floor)
    if ("floor-const", KEY_CONC) in cells:
        const = med("floor-const", KEY_CONC)
        for server in (prod, "daphne"):
            c = med(server, KEY_CONC)
            share = c.rps / const.rps * 100
            _check(
                rows,
                f"{server}: rps at 16 ≥ 70 % of the bare Django view (same run)",
                f"{share:.0f} % ({fmt(c.rps, 0)} of {fmt(const.rps, 0)})",
                share >= 70,
            )
    for server in ("daphne", prod):
        if (server, 1) not in cells:
            continue
        added = med(server, 1).p50 - med("direct", 1).p50
        _check(rows, f"{server}: added p50 at 1 ≤ 1.0 ms", fmt(added), added <= 1.0)
        for conc in (16, 64):
            c = med(server, conc)
            _check(
                rows,
                f"{server}: p99 ≤ 3 x p50 at {conc}",
                f"{fmt(c.p99)} / {fmt(c.p50)}",
                c.p99 <= 3 * c.p50,
            )
    d = streams.get("direct")
    for server in ("daphne", prod):
        s = streams.get(server)
        if s is None or d is None:
            continue
        added = s.ttft_p50 - d.ttft_p50
        _check(rows, f"{server}: stream TTFT added p50 ≤ 1.5 ms", fmt(added), added <= 1.5)
        _check(rows, f"{server}: gap deviation p99 ≤ 2 ms", fmt(s.dev_p99), s.dev_p99 <= 2.0)
        _check(rows, f"{server}: 0 coalesced gaps", str(s.coalesced), s.coalesced == 0)
        _check(
            rows,
            f"{server}: every chunk delivered",
            f"{s.incomplete} incomplete streams",
            s.incomplete == 0,
        )
    for server, h in held.items():
        _check(
            rows,
            f"{server}: {h.opened:,} slow streams, no errors, RSS ≤ 150 MB",
            f"{h.errors} errors, peak {fmt(h.peak_rss_mb, 1)} MB",
            h.errors == 0 and h.peak_rss_mb <= 150,
        )
    for server, (n, r0, r1) in grown.items():
        _check(
            rows,
            f"{server}: RSS growth ≤ 10 MB over {n:,} requests",
            f"{signed(r1 - r0, 1)} MB",
            r1 - r0 <= 10,
        )
    mix = next(r for r in res if r.kind.startswith("mix"))
    _check(
        rows,
        "resolver p50 ≤ 10 µs, p99 ≤ 50 µs (hits)",
        f"{fmt(mix.p50_us)} / {fmt(mix.p99_us)} µs",
        mix.p50_us <= 10 and mix.p99_us <= 50,
    )
    rep.add(
        "### Targets (issue 7)",
        "",
        f"The issue's targets are for the production server ({prod}), plus >= 700 rps for "
        "Daphne; Daphne's other rows hold `make run`'s default server to the same bars, for "
        "comparison.",
        "",
    )
    rep.table(["target", "measured", "met"], rows)


async def _setup(ws: Workspace, servers: list[Proc], *shell: str) -> Proc:
    """Start the fake upstream, fill the database (plus any ``shell`` code), start servers."""
    fake = fake_proc(ws)
    fake.start()
    try:
        fake.wait_http("/v1/models")
        ws.setup(fake.port)
        for code in shell:
            ws.manage("shell", "-c", code)
        ws.env["BENCH_UPSTREAM"] = fake.base  # for bench.floor's proxying view
        for p in servers:
            p.start()
        for p in servers:
            p.wait_http(p.ready_path)
    except BaseException:
        fake.stop()  # the caller only stops what _setup returned
        raise
    return fake


def _header(rep: Report, title: str, started: float, servers: list[Proc], fake: Proc) -> None:
    rep.add(
        f"# {title}",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))} on "
        f"{os.cpu_count()} cores; {versions()}; proxy transport: {transport_name()}.",
        "",
        f"Pinning (taskset): fake upstream (pid {fake.pid}) and the load generator/driver "
        f"(pid {os.getpid()}, aiohttp client on uvloop) on core {LOAD_CORE}; "
        + ", ".join(f"{p.name} (pid {p.pid})" for p in servers)
        + f" on core {HAL0_CORE}, one worker each, HAL0_LOG_LEVEL=WARNING, SQLite in a temp "
        "HAL0_DATA_DIR, one slot `bench` (kind openai) at the fake. `direct` is the load "
        "generator talking to the fake itself. Other work on the machine adds noise: "
        f"load average at start {_loadavg()}.",
        "",
    )


def _loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " / ".join(fh.read().split()[:3]) + f" (1/5/15 min, {os.cpu_count()} cores)"


async def run_all() -> str:
    started = time.time()
    deadline = time.monotonic() + BUDGET_S
    rep = Report()
    res = None
    ws = Workspace()
    daphne, uvi = daphne_proc(ws), uvicorn_proc(ws)
    floor = floor_proc(ws)
    servers = [daphne, uvi]
    fake: Proc | None = None
    try:
        fake = await _setup(ws, [*servers, floor])
        _header(rep, "hal0web benchmark", started, [*servers, floor], fake)
        targets = [Target("direct", fake.base, None)] + [Target(p.name, p.base, p) for p in servers]
        floors = [
            Target("floor-const", floor.base + "/const", floor),
            Target("floor-proxy", floor.base + "/proxy", floor),
        ]
        rss_start = {p.name: p.rss_mb() for p in servers}
        cells = await non_streaming(targets + floors, rep)
        floor_section(rep, cells)
        streams = await streaming(targets, rep)
        held = await hold(targets[1:], rep, HOLD_STREAMS)
        res_rep = Report()
        res = resolver_section(res_rep)
        grown = await growth(targets[1:], rep, deadline - 3.0)
        rep.add(
            "RSS at start -> end of the run: "
            + "; ".join(f"{p.name} {rss_start[p.name]:.1f} -> {p.rss_mb():.1f} MB" for p in servers)
            + ".",
            "",
        )
        rep.lines.extend(res_rep.lines)
        targets_section(rep, cells, streams, held, grown, res, "uvicorn")
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for p in [*servers, floor, *([fake] if fake else [])]:
            p.stop()
        ws.cleanup()
    return rep.text()


def floor_section(rep: Report, cells: dict) -> None:
    """hal0web against the bare Django views, measured in the same rounds."""
    const = _median_cell(cells[("floor-const", KEY_CONC)])
    proxy = _median_cell(cells[("floor-proxy", KEY_CONC)])
    parts = []
    for name in ("daphne", "uvicorn"):
        c = _median_cell(cells[(name, KEY_CONC)])
        parts.append(
            f"{name} {c.rps:,.0f} rps = {c.rps / const.rps * 100:.0f} % of the constant view, "
            f"{c.rps / proxy.rps * 100:.0f} % of the proxying view"
        )
    rep.add(
        f"Floor, same rounds (bench/floor.py: bare Django async views, no middleware, stock "
        f"ASGIHandler, Uvicorn on core {HAL0_CORE}): at {KEY_CONC} concurrent the constant view "
        f"answers {const.rps:,.0f} rps ({const.cpu_ms:.3f} CPU ms/req), the view proxying "
        f"through one pooled aiohttp session {proxy.rps:,.0f} rps ({proxy.cpu_ms:.3f} CPU "
        f"ms/req). hal0web: " + "; ".join(parts) + " (target: >= 70 % of the constant view).",
        "",
    )


async def run_hold(prompts_kb: tuple[float, ...] = (0.1, 16.0)) -> str:
    """Only the slow-stream hold, once per prompt size, each on freshly started servers: what
    a worker keeps per open stream when requests carry real prompts (a long chat is tens of
    KB)."""
    started = time.time()
    rep = Report()
    rep.add("# hal0web: slow streams by prompt size", "")
    for kb in prompts_kb:
        ws = Workspace()
        servers = [daphne_proc(ws), uvicorn_proc(ws)]
        fake: Proc | None = None
        try:
            fake = await _setup(ws, servers)
            part = Report()
            _header(part, f"prompt {kb:g} KB", time.time(), servers, fake)
            rep.lines.extend(part.lines)
            await hold([Target(p.name, p.base, p) for p in servers], rep, HOLD_STREAMS, kb)
        finally:
            for p in [*servers, *([fake] if fake else [])]:
                p.stop()
            ws.cleanup()
    rep.add(f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}.")
    return rep.text()


async def run_transports(names: tuple[str, ...] = ("httpx", "httpx-aiohttp", "aiohttp")) -> str:
    """httpx's own pool vs httpx-aiohttp vs our aiohttp transport, hal0web under Uvicorn."""
    started = time.time()
    rep = Report()
    ws = Workspace()
    variants = [variant_proc(ws, name) for name in names]
    fake: Proc | None = None
    try:
        fake = await _setup(ws, variants)
        _header(rep, "hal0web proxy transports", started, variants, fake)
        targets = [Target("direct", fake.base, None)] + [
            Target(p.name, p.base, p) for p in variants
        ]
        await non_streaming(targets, rep)
        await streaming(targets, rep)
        await hold(targets[1:], rep, HOLD_STREAMS)
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for p in [*variants, *([fake] if fake else [])]:
            p.stop()
        ws.cleanup()
    return rep.text()


async def run_scale(redis_url: str = "redis://127.0.0.1:6379/15") -> str:
    """What coordinating several processes costs one: Uvicorn with and without Redis, on the
    usual slot (no limit: Redis carries the live events) and on a slot with a max_concurrency
    it never reaches (Redis also keeps the global places, dispatch.coordination.redis_places)."""
    started = time.time()
    rep = Report()
    ws = Workspace()
    servers = []
    for limit in (0, 1000):
        for redis in (False, True):
            name = "uvicorn" + ("+redis" if redis else "") + (f"+limit{limit}" if limit else "")
            proc = uvicorn_proc(ws, name)
            if redis:
                proc.extra_env["REDIS_URL"] = redis_url
            proc.database_sql = f"UPDATE dispatch_slot SET max_concurrency = {limit}"
            servers.append(proc)
    fake: Proc | None = None
    try:
        fake = await _setup(ws, servers)
        _header(rep, "hal0web: the cost of coordination (Redis on vs off)", started, servers, fake)
        targets = [Target("direct", fake.base, None)] + [Target(p.name, p.base, p) for p in servers]
        cells = await non_streaming(targets, rep)
        for suffix, what in (("", "no limit"), ("+limit1000", "max_concurrency 1000")):
            off = _median_cell(cells[("uvicorn" + suffix, KEY_CONC)])
            on = _median_cell(cells[("uvicorn+redis" + suffix, KEY_CONC)])
            ratio = on.rps / off.rps if off.rps else float("nan")
            rep.add(
                f"**{what}: Redis on / off at {KEY_CONC} concurrent: {fmt(on.rps, 0)} / "
                f"{fmt(off.rps, 0)} rps = {fmt(ratio * 100, 1)} %; CPU per request "
                f"{fmt(on.cpu_ms, 3)} / {fmt(off.cpu_ms, 3)} ms** (target >= 90 %: "
                f"{'met' if ratio >= 0.9 else 'NOT met'}).",
                "",
            )
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for p in [*servers, *([fake] if fake else [])]:
            p.stop()
        ws.cleanup()
    return rep.text()


def main(argv: list[str]) -> int:
    # The driver is the load generator: it shares core 0 with the fake upstream.
    os.sched_setaffinity(0, {LOAD_CORE})
    mode = argv[0] if argv else "all"
    if mode == "all":
        text = uvloop.run(run_all())
        out = RESULTS / "latest.md"
    elif mode == "seam":
        import django

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")
        django.setup()
        from bench import seam

        text = uvloop.run(seam.run())
        out = RESULTS / "seam.md"
    elif mode == "llama":
        from bench import llama

        text = uvloop.run(llama.run())
        out = RESULTS / "llama.md"
    elif mode == "hold":
        sizes = tuple(float(kb) for kb in argv[1:]) or (0.1, 16.0)
        text = uvloop.run(run_hold(sizes))
        out = RESULTS / "hold.md"
    elif mode == "scale":
        text = uvloop.run(run_scale(*argv[1:2]))
        out = RESULTS / "scale.md"
    elif mode == "cost":
        from bench import cost

        text = uvloop.run(cost.run(*(int(n) for n in argv[1:2])))
        out = RESULTS / "cost.md"
    elif mode == "commits" and argv[1:]:
        from bench import commits

        text = uvloop.run(commits.run(argv[1], *(int(n) for n in argv[2:3])))
        out = RESULTS / "commits.md"
    elif mode == "instructions" and argv[1:]:
        from bench import instructions

        text = instructions.run(argv[1])
        out = RESULTS / "instructions.md"
    elif mode == "served":
        from bench import served

        text = served.main(argv[1:])
        out = RESULTS / "served.md"
    elif mode == "objects":
        from bench import objects

        text = objects.run()
        out = RESULTS / "objects.md"
    elif mode == "breakdown":
        from bench import breakdown

        text = breakdown.report(*(int(n) for n in argv[1:2]))
        out = RESULTS / "breakdown.md"
    elif mode in ("models", "servers", "workers", "crowds"):
        import importlib

        text = uvloop.run(importlib.import_module(f"bench.{mode}").run())
        out = RESULTS / f"{mode}.md"
    elif mode == "transports":
        text = uvloop.run(run_transports(*([tuple(argv[1:])] if argv[1:] else [])))
        out = RESULTS / "transports.md"
    elif mode == "probes":
        from bench import probes

        text = probes.run()
        out = RESULTS / "probes.md"
    else:
        print(
            "usage: python -m bench [all | seam | llama | models | servers | workers | crowds | "
            "probes | "
            "hold [PROMPT_KB ...] | cost [ROUNDS] | transports [VARIANT ...] | "
            "scale [REDIS_URL] | commits REV [ROUNDS] | instructions REV | "
            "served [CONFIG ...] | objects | breakdown [REQUESTS]]\n"
            "  VARIANT: httpx | httpx-aiohttp | aiohttp, optionally +bare (see bench/serve.py)",
            file=sys.stderr,
        )
        return 2
    RESULTS.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"(written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
