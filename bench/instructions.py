"""``python -m bench instructions REV``: instructions per /v1 request, this tree against REV.

Wall-clock cells on a shared 2-core machine swing by ±20 % from round to round; instructions
do not. Each case of bench/inproc.py runs under callgrind (valgrind; Debian's package) at two
request counts, for REV's code (a throwaway worktree) and this tree's; the difference over
the difference in requests is one request's instructions on the event loop's thread, its
start-up and warm-up cancelled out. Two runs of one commit agree within 0.1 %. What it leaves
out is the same for both: the HTTP server's parsing and the sockets (bench/commits.py has
those, with their noise).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.commits import _git, _worktree
from bench.procs import ROOT

CASES = ("chat", "stream32")
FEW, MANY = 100, 600


def _instructions(tree: Path, case: str, n: int) -> int:
    """The event loop thread's instructions for ``n`` requests (plus start-up)."""
    with tempfile.TemporaryDirectory(prefix="hal0-cg-") as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--separate-threads=yes",
                f"--callgrind-out-file={out}/cg.%p",
                sys.executable,
                str(ROOT / "bench" / "inproc.py"),
                case,
                str(n),
            ],
            cwd=tree,
            env=env,
            check=True,
            capture_output=True,
        )
        main_thread = next(p for p in Path(out).iterdir() if p.name.endswith("-01"))
        for line in main_thread.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no totals for {case} x {n}")


def per_request(tree: Path, case: str) -> float:
    return (_instructions(tree, case, MANY) - _instructions(tree, case, FEW)) / (MANY - FEW)


def run(rev: str) -> str:
    label = _git("rev-parse", "--short", rev)
    tree = _worktree(rev)
    lines = [
        f"# hal0web: instructions per request, this tree against {label}",
        "",
        f"callgrind, the event loop's thread, ({MANY} - {FEW} requests) in one process "
        "(bench/inproc.py: the ASGI app, a canned upstream).",
        "",
        f"| case | {label} | this tree | this / {label} |",
        "|---|---|---|---|",
    ]
    try:
        for case in CASES:
            print(f"  {case} ...", file=sys.stderr, flush=True)
            before, now = per_request(tree, case), per_request(ROOT, case)
            lines.append(f"| {case} | {before:,.0f} | {now:,.0f} | {now / before * 100:.1f} % |")
    finally:
        _git("worktree", "remove", "--force", str(tree))
    return "\n".join(lines) + "\n"
