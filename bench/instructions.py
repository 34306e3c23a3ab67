"""``python -m bench instructions REV``: instructions per /v1 request, this tree against REV.

Wall-clock cells on a shared 2-core machine swing by ±20 % from round to round; instructions
do not. Each case of bench/inproc.py runs under callgrind (valgrind; Debian's package) at two
request counts, for REV's code (a throwaway worktree) and this tree's; the difference over
the difference in requests is one request's instructions on the event loop's thread, its
start-up and warm-up cancelled out. Two runs of one commit agree within 0.1 %. What it leaves
out is the same for both: the HTTP server's parsing and the sockets (bench/commits.py has
those, with their noise).

Issue 21's cases (``chat-loads``, ``stream32-loads``) send the same requests to a slot that
loads models, its model loaded: what the loads path costs a request for a loaded model, set
against the plain case in this tree (and against REV's plain case). A tree from before
those slots has no such case: its cell says so.
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
# Each on a slot that loads models (its model loaded), against the plain case it repeats.
LOADS_CASES = {"chat-loads": "chat", "stream32-loads": "stream32"}
# Issue 22: Anthropic Messages translated to chat/completions, against the same request passed
# through to a slot that speaks Messages (this tree only): the added instructions per request,
# and per streamed chunk (the stream's added cost less the request's, over its 32 chunks).
TRANSLATION_CASES = {
    "messages-translated": "messages",
    "stream32-messages-translated": "stream32-messages",
}
CHUNKS = 32
FEW, MANY = 100, 600
SKIP_STATUS = 3  # bench/inproc.py's: the tree has no slots that load models


def _instructions(tree: Path, case: str, n: int) -> int:
    """The event loop thread's instructions for ``n`` requests (plus start-up)."""
    with tempfile.TemporaryDirectory(prefix="hal0-cg-") as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        done = subprocess.run(
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
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{case} x {n} failed in {tree}:\n{done.stderr[-3000:]}")
        main_thread = next(p for p in Path(out).iterdir() if p.name.endswith("-01"))
        for line in main_thread.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no totals for {case} x {n}")


def _absent(tree: Path, case: str) -> str | None:
    """Why ``tree`` has no such case (bench/inproc.py says so at once, without valgrind:
    migrating under callgrind alone takes a minute), or None."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    script = str(ROOT / "bench" / "inproc.py")
    done = subprocess.run(
        [sys.executable, script, case, "0"], cwd=tree, env=env, capture_output=True, text=True
    )
    if done.returncode == SKIP_STATUS:
        return done.stderr.strip().splitlines()[-1]
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed in {tree}:\n{done.stderr[-3000:]}")
    return None


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
    here: dict[str, float] = {}
    there: dict[str, float] = {}
    notes: list[str] = []
    try:
        for case in CASES:
            print(f"  {case} ...", file=sys.stderr, flush=True)
            there[case], here[case] = per_request(tree, case), per_request(ROOT, case)
            lines.append(
                f"| {case} | {there[case]:,.0f} | {here[case]:,.0f} | "
                f"{here[case] / there[case] * 100:.1f} % |"
            )
        for case in LOADS_CASES:
            print(f"  {case} ...", file=sys.stderr, flush=True)
            here[case] = per_request(ROOT, case)
            why = _absent(tree, case)
            if why is None:
                there[case] = per_request(tree, case)
            else:
                notes.append(f"{case} at {label}: not run ({why})")
            then = f"{there[case]:,.0f}" if case in there else "n/a"
            ratio = f"{here[case] / there[case] * 100:.1f} %" if case in there else "n/a"
            lines.append(f"| {case} | {then} | {here[case]:,.0f} | {ratio} |")
    finally:
        _git("worktree", "remove", "--force", str(tree))
    lines += [
        "",
        "A request for a loaded model on a slot that loads models, against the same request "
        "on a plain slot:",
        "",
        f"| case | plain, this tree | loads slot, this tree | loads / plain | "
        f"loads slot, this tree / plain at {label} |",
        "|---|---|---|---|---|",
    ]
    for case, plain in LOADS_CASES.items():
        lines.append(
            f"| {case} | {here[plain]:,.0f} | {here[case]:,.0f} | "
            f"{here[case] / here[plain] * 100:.1f} % | {here[case] / there[plain] * 100:.1f} % |"
        )
    lines += ["", *(f"Note: {n}." for n in notes)]
    return "\n".join([*lines, *translation()]) + "\n"


def translation() -> list[str]:
    """What translating costs over passing through, in this tree."""
    here: dict[str, float] = {}
    for case, native in TRANSLATION_CASES.items():
        for name in (native, case):
            print(f"  {name} ...", file=sys.stderr, flush=True)
            here[name] = per_request(ROOT, name)
    lines = [
        "",
        "Anthropic Messages translated to chat/completions, against the same request passed "
        "through to a slot that speaks Messages (this tree):",
        "",
        "| case | passthrough | translated | added | translated / passthrough |",
        "|---|---|---|---|---|",
    ]
    for case, native in TRANSLATION_CASES.items():
        added = here[case] - here[native]
        lines.append(
            f"| {case} | {here[native]:,.0f} | {here[case]:,.0f} | {added:,.0f} | "
            f"{here[case] / here[native] * 100:.1f} % |"
        )
    per_request_added = here["messages-translated"] - here["messages"]
    stream_added = here["stream32-messages-translated"] - here["stream32-messages"]
    per_chunk = (stream_added - per_request_added) / CHUNKS
    lines += ["", f"Added per streamed chunk: {per_chunk:,.0f} instructions."]
    return lines
