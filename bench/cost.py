"""``python -m bench cost``: what metrics and the request log cost a request.

The same hal0web (Uvicorn, the production server, on its own core) twice, each on its own
copy of one database: once with ``HAL0_METRICS=false HAL0_REQUEST_LOG=false``, once with both on; cells
at 1 and 16 concurrent, interleaved off/on in every round so drift on the machine hits both
alike, each figure the median of the rounds. Targets (issue 16): at 16 concurrent, rps with
both on >= 95 % of rps with both off; at 1 concurrent, the added p50 grows <= 0.05 ms.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from typing import Any

import orjson

from bench.procs import HAL0_CORE, PY, ROOT, Proc, Workspace, free_port

ROUNDS = 5
CELL_S = 2.5
CONCURRENCY = (1, 16)


def _proc(ws: Workspace, name: str, on: bool) -> Proc:
    from dispatch.management.commands.serve import server_command

    port = free_port()
    argv = server_command("uvicorn", "127.0.0.1", port, access_log=None)
    flag = "true" if on else "false"
    proc = ws.server(name, argv, port)  # its own copy of the database: SQLite serves one
    proc.extra_env.update(HAL0_METRICS=flag, HAL0_REQUEST_LOG=flag)
    return proc


def _records(ws: Workspace, cpu_ms_off: float) -> list[str]:
    """What the two switches add per request, in-process (bench/records.py), pinned like
    hal0web; and what that is of the off run's CPU per request at 16 concurrent."""
    out = subprocess.run(
        ["taskset", "-c", str(HAL0_CORE), PY, "-m", "bench.records"],
        # Room for every row: a row dropped would be work not measured.
        env={**ws.env, "HAL0_LOG_QUEUE_SIZE": "1000000"},
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    r = orjson.loads(out.stdout.strip().splitlines()[-1])
    share = r["delta_us"] / 1000 / cpu_ms_off * 100 if cpu_ms_off else float("nan")
    return [
        f"In-process (bench/records.py, {r['written']:,} rows written): CPU per recorded "
        f"request {r['off_us']:.1f} µs off, {r['on_us']:.1f} µs on, +{r['delta_us']:.1f} µs "
        f"(request-log writer thread included) = {share:.1f} % of the off run's "
        f"{cpu_ms_off:.3f} CPU ms per request at 16 concurrent: the rps bound that CPU alone "
        f"sets is {100 / (1 + share / 100):.1f} % of off.",
        "",
    ]


Cells = dict[tuple[str, int], list[Any]]


async def interleaved(
    targets: list[Any], rounds: int, concurrency: tuple[int, ...] = CONCURRENCY
) -> Cells:
    """Every target's cell at every concurrency, once per round, in turn: drift on the
    machine hits them all alike."""
    from bench.__main__ import cell

    cells: Cells = {}
    for _ in range(rounds):
        for conc in concurrency:
            for t in targets:
                cells.setdefault((t.name, conc), []).append(await cell(t, conc, CELL_S))
    return cells


def median(cells: Cells, name: str, conc: int, attr: str) -> float:
    return statistics.median(getattr(c, attr) for c in cells[(name, conc)])


def table_rows(
    cells: Cells, targets: list[Any], concurrency: tuple[int, ...] = CONCURRENCY
) -> list[list[str]]:
    """One row per target and concurrency: medians of rps, p50, p99, CPU per request."""
    from bench.__main__ import fmt

    rows = []
    for conc in concurrency:
        for t in targets:
            rows.append(
                [
                    t.name,
                    str(conc),
                    fmt(median(cells, t.name, conc, "rps"), 0),
                    fmt(median(cells, t.name, conc, "p50"), 3),
                    fmt(median(cells, t.name, conc, "p99"), 3),
                    "" if t.proc is None else fmt(median(cells, t.name, conc, "cpu_ms"), 3),
                    str(sum(c.errors for c in cells[(t.name, conc)])),
                ]
            )
    return rows


async def run(rounds: int = ROUNDS) -> str:
    from bench.__main__ import Report, _header, _loadavg, _setup, signed

    started = time.time()
    rep = Report()
    ws = Workspace()
    off, on = _proc(ws, "uvicorn-off", False), _proc(ws, "uvicorn-on", True)
    fake: Proc | None = None
    try:
        fake = await _setup(ws, [off, on])
        _header(rep, "hal0web: the cost of metrics and the request log", started, [off, on], fake)
        from bench.__main__ import Target

        targets = [
            Target("direct", fake.base, None),
            Target(off.name, off.base, off),
            Target(on.name, on.base, on),
        ]
        cells = await interleaved(targets, rounds)

        def med(name: str, conc: int, attr: str) -> float:
            return median(cells, name, conc, attr)

        rows = table_rows(cells, targets)
        rep.add(f"Medians of {rounds} interleaved rounds, {CELL_S:g} s per cell.", "")
        rep.table(["target", "conc", "rps", "p50 ms", "p99 ms", "CPU ms/req", "errors"], rows)
        ratio = med(on.name, 16, "rps") / med(off.name, 16, "rps")
        grow = med(on.name, 1, "p50") - med(off.name, 1, "p50")
        cpu = med(on.name, 16, "cpu_ms") - med(off.name, 16, "cpu_ms")
        rep.table(
            ["target", "measured", "holds"],
            [
                [
                    "C=16 rps, on / off >= 95 %",
                    f"{ratio * 100:.1f} %",
                    "yes" if ratio >= 0.95 else "NO",
                ],
                [
                    "C=1 added p50, on - off <= +0.05 ms",
                    f"{signed(grow, 3)} ms",
                    "yes" if grow <= 0.05 else "NO",
                ],
                ["C=16 CPU per request, on - off", f"{signed(cpu, 3)} ms", ""],
            ],
        )
        per_round = [
            f"{a.rps / b.rps * 100:.1f} %"
            for a, b in zip(cells[(on.name, 16)], cells[(off.name, 16)], strict=True)
        ]
        rep.add("C=16 on/off per round: " + ", ".join(per_round) + ".", "")
        rep.add(*_records(ws, med(off.name, 16, "cpu_ms")))
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for p in [off, on, *([fake] if fake else [])]:
            p.stop()
        ws.cleanup()
    return rep.text()
