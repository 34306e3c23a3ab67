"""``python -m bench.quiet_server APP PORT``: a server for bench/served.py to count.

The same Uvicorn configuration as ``make run`` (httptools, uvloop, backlog 4096, no access
log; dispatch/management/commands/serve.py), with what runs on a clock rather than per
request kept out of the count. Under callgrind a request takes ~50 times as long, so work
done every 0.25 s would land on each request 50 times as heavily as it does natively, and
by however long that request happened to take:

- the follower's version check (every 0.25 s: a thread hop and a query) is not started;
  ``HAL0_WATCHER=false`` (set by the harness) keeps the probes out too;
- the request-log writer gathers until told to write (SIGUSR2, sent by bench/served.py after
  each run of requests), not for 0.2 s: its batches are then the same from one run to the
  next (how many rows a timed gathering caught swung the stream case's figure by 2 %), and
  hold as many rows as they do under load natively, so the figure counts each row's cost,
  not the per-transaction cost a request would carry alone at callgrind's pace.

What is left on a clock (Uvicorn's tick) is the same for every server and is measured over
an idle window and taken out by bench/served.py.

With ``BENCH_PROFILE=FILE`` (bench/breakdown.py) the process profiles itself with cProfile
from its first SIGUSR1 (after the warm-up) and writes the statistics to FILE when it stops.
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys

import uvicorn


def main(app: str, port: int) -> None:
    if app.startswith("hal0web"):
        import django

        django.setup()
        from dispatch.coordination import sync
        from dispatch.observability import requestlog

        sync.ensure_following = lambda: None
        requestlog.LINGER_S = 1e9  # until SIGUSR2
        signal.signal(signal.SIGUSR2, lambda *_: requestlog.writer.write_now())
    profile_to = os.environ.get("BENCH_PROFILE")
    profiler = cProfile.Profile()
    if profile_to:
        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

        def write_out(*_: object) -> None:
            # Uvicorn raises the signal that stopped it again once it is done, with the
            # handler that was there before it: this one.
            profiler.disable()
            profiler.dump_stats(profile_to)
            raise SystemExit(0)

        signal.signal(signal.SIGTERM, write_out)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        backlog=4096,
        access_log=False,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
