"""``python -m bench breakdown [N]``: where a /v1 request's time goes, part by part.

hal0web (bench/quiet_server.py, as bench/served.py runs it, natively) profiles itself with
cProfile over N non-streaming chat requests sent one at a time after a warm-up; every
function's own time (cProfile's ``tottime``) is given to the part of hal0web (or of what it
stands on) its module belongs to. cProfile inflates small calls, so the shares are the
figure, not the microseconds; bench/served.py's instructions per request, split by these
shares, say roughly how many instructions each part costs.
"""

from __future__ import annotations

import http.client
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.procs import ROOT, Workspace, fake_proc, free_port
from bench.served import CASES, WARM, _request

# (part, what a function's file path contains), first match wins: hal0web's own rooms first.
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "auth and Host/Origin checks",
        (
            "dispatch/api/keys.py",
            "dispatch/api/guard.py",
            "dispatch/api/cors.py",
            "dispatch/coordination/keyring.py",
        ),
    ),
    (
        "parse (body, model)",
        ("dispatch/api/bodies.py", "dispatch/api/pipeline.py", "dispatch/wire/"),
    ),
    (
        "resolve",
        (
            "dispatch/api/decide.py",
            "dispatch/routing/resolver.py",
            "dispatch/routing/table.py",
            "dispatch/routing/scopes.py",
            "dispatch/routing/speaks.py",
            "dispatch/routing/patterns.py",
            "dispatch/coordination/store.py",
        ),
    ),
    (
        "decision record and explanation",
        ("dispatch/observability/decisions.py", "dispatch/routing/explain.py"),
    ),
    ("log line", ("dispatch/observability/log_handlers.py", "/logging/")),
    ("metrics", ("dispatch/observability/metrics.py", "prometheus_client")),
    ("request log row", ("dispatch/observability/requestlog.py",)),
    (
        "event",
        (
            "dispatch/web/live.py",
            "dispatch/coordination/events.py",
            "channels/",
            "dispatch/lib/listeners.py",
        ),
    ),
    ("headers", ("dispatch/api/responses.py", "dispatch/upstream/headers.py")),
    ("relay and forward", ("dispatch/api/relay.py", "dispatch/upstream/", "dispatch/api/")),
    ("httpx API at the seam", ("httpx/",)),
    ("aiohttp (upstream client)", ("aiohttp/", "yarl/", "multidict/")),
    ("Django request and response", ("django/",)),
    ("Uvicorn (HTTP server)", ("uvicorn/", "httptools")),
    ("asyncio (tasks, timeouts)", ("asyncio/", "uvloop")),
    ("other hal0web", ("dispatch/", "hal0web/")),
)
OTHER = "built-ins and the rest"


def part_of(path: str) -> str:
    for part, needles in PARTS:
        if any(n in path for n in needles):
            return part
    return OTHER


def shares(stats: pstats.Stats) -> dict[str, float]:
    """Each part's share of the process's own time (sums to 1)."""
    by_part: dict[str, float] = {}
    raw = stats.stats  # type: ignore[attr-defined]
    for (path, _line, _name), (_cc, _nc, tottime, _ct, _callers) in raw.items():
        by_part[part_of(path)] = by_part.get(part_of(path), 0.0) + tottime
    total = sum(by_part.values()) or 1.0
    return {part: t / total for part, t in by_part.items()}


def profile(requests: int) -> tuple[dict[str, float], float]:
    """The shares over ``requests`` chat requests, and the profiled ms per request."""
    ws = Workspace()
    fake = fake_proc(ws)
    with tempfile.TemporaryDirectory(prefix="hal0-prof-") as tmp:
        out = Path(tmp) / "hal0.prof"
        try:
            fake.start()
            fake.wait_http("/v1/models")
            ws.setup(fake.port)
            port = free_port()
            argv = [
                sys.executable,
                "-m",
                "bench.quiet_server",
                "hal0web.asgi:application",
                str(port),
            ]
            proc = ws.server("hal0web", argv, port)
            proc.extra_env.update(HAL0_WATCHER="false", BENCH_PROFILE=str(out))
            proc.start()
            proc.wait_http("/v1/models")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for _ in range(WARM):
                _request(conn, CASES["chat"], None, fake.port)
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.2)
            for _ in range(requests):
                _request(conn, CASES["chat"], None, fake.port)
            conn.close()
            proc.stop()
            if not out.exists():
                raise RuntimeError(f"hal0web wrote no profile; its log:\n{proc.log_tail()}")
            stats = pstats.Stats(str(out))
        finally:
            fake.stop()
            ws.cleanup()
    per_request_ms = stats.total_tt * 1000 / requests  # type: ignore[attr-defined]
    return shares(stats), per_request_ms


def report(requests: int = 3000) -> str:
    found, ms = profile(requests)
    label = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"# hal0web: where a chat request's time goes ({label})",
        "",
        f"cProfile, own time per function grouped by part, {requests} non-streaming chat "
        f"requests one at a time ({ms:.2f} ms per request under the profiler); bench/breakdown.py.",
        "",
        "| part | share |",
        "|---|---|",
    ]
    for part, share in sorted(found.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {part} | {share * 100:.1f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(report(*(int(n) for n in sys.argv[1:2])))
