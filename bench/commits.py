"""``python -m bench commits REV [ROUNDS]``: this checkout against another commit, in one run.

A refactor promises no cost: the same hal0web (Uvicorn, on its own core, its own copy of one
database) from a throwaway ``git worktree`` of REV and from this tree, cells at 1 and 16
concurrent interleaved in every round (bench/cost.py's), each figure the median of the
rounds. Targets (issue 20): at 16 concurrent, rps >= 98 % of REV's; at 1 concurrent, the p50
within 0.05 ms of REV's. CPU per request is the steadier figure on a shared machine: it is
reported beside them.

A third hal0web of this tree (``this-tree+loads``) serves the same requests through a slot
that loads models (issue 21): kind ``llamacpp`` at the fake's ``/router/`` face (llama.cpp's
router, ``--models-max 1``, its one model loaded), so every request takes the loads path
for a loaded model; its database row is checked after the run (the watcher keeps those
fields as the router says them). Issue 21's target: C=16 within 2 % of REV's.
"""

from __future__ import annotations

import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

from bench.cost import CELL_S, interleaved, median, table_rows
from bench.procs import ROOT, Proc, Workspace, free_port

ROUNDS = 6
# The bench slot made one that loads models: the fake's llama.cpp-router face, at its limit
# of one model, that model loaded (what the watcher then reads from the fake, too).
LOADS_SQL = """
UPDATE dispatch_slot SET kind = 'llamacpp', loads_models = 1, model_limit = 1,
    url = replace(url, '/v1', '/router/v1');
UPDATE dispatch_slotmodel SET load_state = 'loaded';
"""


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
    loads = _proc(ws, "this-tree+loads", ROOT)
    loads.database_sql = LOADS_SQL
    servers = [before, now, loads]
    fake: Proc | None = None
    try:
        fake = await _setup(ws, servers)
        _header(rep, f"hal0web: this tree against {label}", started, servers, fake)
        targets = [
            Target("direct", fake.base, None),
            *(Target(p.name, p.base, p) for p in servers),
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
        l_ratio = med(loads.name, 16, "rps") / med(before.name, 16, "rps")
        l_plain = med(loads.name, 16, "rps") / med(now.name, 16, "rps")
        l_cpu = med(loads.name, 16, "cpu_ms") / med(now.name, 16, "cpu_ms")
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
                [
                    f"C=16 rps, this+loads / {label} >= 98 % (issue 21: within 2 %)",
                    f"{l_ratio * 100:.1f} %",
                    _yes(l_ratio >= 0.98),
                ],
                ["C=16 rps, this+loads / this (same tree)", f"{l_plain * 100:.1f} %", ""],
                ["C=16 CPU per request, this+loads / this", f"{l_cpu * 100:.1f} %", ""],
            ],
        )
        for who in (now, loads):
            per_round = [
                f"{a.rps / b.rps * 100:.1f} %"
                for a, b in zip(cells[(who.name, 16)], cells[(before.name, 16)], strict=True)
            ]
            rep.add(f"C=16 {who.name}/{label} per round: " + ", ".join(per_round) + ".", "")
        rep.add(_loads_slot(loads), "")
        rep.add(
            f"Total bench time: {time.time() - started:.0f} s; load average at end {_loadavg()}."
        )
    finally:
        for p in [*servers, *([fake] if fake else [])]:
            p.stop()
        ws.cleanup()
        _git("worktree", "remove", "--force", str(tree))
    return rep.text()


def _loads_slot(proc: Proc) -> str:
    """What the loads slot's own database says after the run: did it stay one that loads
    models, its model loaded (else its cells measured something else)?"""
    assert proc.database is not None
    db = sqlite3.connect(proc.database[1])
    try:
        kind, loads, limit, url = db.execute(
            "SELECT kind, loads_models, model_limit, url FROM dispatch_slot"
        ).fetchone()
        states = [s for (s,) in db.execute("SELECT load_state FROM dispatch_slotmodel")]
    finally:
        db.close()
    ok = kind == "llamacpp" and loads and limit == 1 and states == ["loaded"]
    return (
        f"{proc.name}'s slot after the run: kind {kind}, loads_models {bool(loads)}, "
        f"model_limit {limit}, url {url}, its model {', '.join(states)}: "
        + (
            "every request took the loads path for a loaded model."
            if ok
            else "**NOT a loads slot with its model loaded: its cells do not measure the loads path.**"
        )
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"
