"""``python -m bench commits REV [ROUNDS]``: this checkout against another commit, in one run.

A refactor promises no cost: the same hal0web (Uvicorn, on its own core, its own copy of one
database) from a throwaway ``git worktree`` of REV and from this tree, cells at 1 and 16
concurrent interleaved in every round (bench/cost.py's), each figure the median of the
rounds. Targets (issue 20): at 16 concurrent, rps >= 98 % of REV's; at 1 concurrent, the p50
within 0.05 ms of REV's. CPU per request is the steadier figure on a shared machine: it is
reported beside them.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from bench.cost import CELL_S, interleaved, median, table_rows
from bench.procs import ROOT, Proc, Workspace, free_port

ROUNDS = 6


def _proc(ws: Workspace, name: str, tree: Path) -> Proc:
    from dispatch.management.commands.serve import server_command

    port = free_port()
    proc = ws.server(name, server_command("uvicorn", "127.0.0.1", port, access_log=None), port)
    proc.cwd = tree
    proc.extra_env["PYTHONPATH"] = str(tree)  # before the editable install of this tree
    return proc


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def _worktree(rev: str) -> Path:
    where = Path(tempfile.mkdtemp(prefix="hal0-bench-rev-"))
    _git("worktree", "add", "--detach", "-q", str(where), rev)
    return where


async def run(rev: str, rounds: int = ROUNDS) -> str:
    from bench.__main__ import Report, Target, _header, _loadavg, _setup, signed

    started = time.time()
    label = _git("rev-parse", "--short", rev)
    rep = Report()
    ws = Workspace()
    tree = _worktree(rev)
    before, now = _proc(ws, f"at-{label}", tree), _proc(ws, "this-tree", ROOT)
    fake: Proc | None = None
    try:
        fake = await _setup(ws, [before, now])
        _header(rep, f"hal0web: this tree against {label}", started, [before, now], fake)
        targets = [
            Target("direct", fake.base, None),
            Target(before.name, before.base, before),
            Target(now.name, now.base, now),
        ]
        cells = await interleaved(targets, rounds)

        def med(name: str, conc: int, attr: str) -> float:
            return median(cells, name, conc, attr)

        rep.add(f"Medians of {rounds} interleaved rounds, {CELL_S:g} s per cell.", "")
        rep.table(
            ["target", "conc", "rps", "p50 ms", "p99 ms", "CPU ms/req", "errors"],
            table_rows(cells, targets),
        )
        ratio = med(now.name, 16, "rps") / med(before.name, 16, "rps")
        added = med(now.name, 1, "p50") - med(before.name, 1, "p50")
        cpu = med(now.name, 16, "cpu_ms") / med(before.name, 16, "cpu_ms")
        rep.table(
            ["target", "measured", "holds"],
            [
                [f"C=16 rps, this / {label} >= 98 %", f"{ratio * 100:.1f} %", _yes(ratio >= 0.98)],
                [
                    f"C=1 p50, this - {label} <= +0.05 ms",
                    f"{signed(added, 3)} ms",
                    _yes(added <= 0.05),
                ],
                [f"C=16 CPU per request, this / {label}", f"{cpu * 100:.1f} %", ""],
            ],
        )
        per_round = [
            f"{a.rps / b.rps * 100:.1f} %"
            for a, b in zip(cells[(now.name, 16)], cells[(before.name, 16)], strict=True)
        ]
        rep.add(f"C=16 this/{label} per round: " + ", ".join(per_round) + ".", "")
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for p in [before, now, *([fake] if fake else [])]:
            p.stop()
        ws.cleanup()
        _git("worktree", "remove", "--force", str(tree))
    return rep.text()


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"
