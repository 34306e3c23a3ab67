"""``python -m bench.records``: CPU per recorded request with metrics and the request log off
vs on, in one process, without HTTP around it (run by ``python -m bench cost``).

Under a busy machine the HTTP cells of ``bench cost`` swing by tens of percent from round
to round; this measures only what the two switches add — the outputs themselves and the
request-log writer thread's share of the process's CPU — as process CPU time per record.
Prints one JSON object.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

import orjson

N = 20_000
ROUNDS = 5


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hal0web.settings")
    import django

    django.setup()
    from dispatch.observability import decisions, metrics, requestlog
    from dispatch.observability.decisions import DecisionRecord
    from dispatch.routing.resolver import Decision, resolve
    from dispatch.routing.table import ModelEntry, RoutingTable, make_slot

    table = RoutingTable.build(
        1,
        [
            make_slot(
                "bench",
                "http://127.0.0.1:1/v1",
                [ModelEntry("bench-model", "bench-model", "manifest", True)],
                state="ready",
            )
        ],
    )
    decision = resolve(table, "bench-model", "chat/completions")
    assert isinstance(decision, Decision)

    def one(i: int) -> DecisionRecord:
        # What a routed, answered request leaves (as in api.proxy_view).
        return DecisionRecord(
            request_id=f"{i:032x}",
            endpoint="chat/completions",
            model="bench-model",
            slot="bench",
            upstream_model="bench-model",
            resolution_path=decision.resolution_path,
            status=200,
            duration_ms=1.2,
            at=time.time(),
            ttfb_ms=1.0,
            added_ms=0.05,
            prompt_tokens=9,
            completion_tokens=7,
            decision=decision,
            seen_inflight=(0,),
        )

    # The live event needs a running loop and a channel layer: both runs leave it out alike.
    base: list[decisions.Output] = [decisions.log_output]

    def run(outputs: list[decisions.Output], start: int) -> float:
        decisions.outputs[:] = outputs
        c0 = _cpu()
        for i in range(start, start + N):
            decisions.record(one(i))
        requestlog.writer.flush(120)  # the writer's work counts too
        return (_cpu() - c0) / N * 1e6

    off, on = [], []
    for r in range(ROUNDS):
        off.append(run(base, 2 * r * N))
        on.append(run([*base, metrics.output, requestlog.output], (2 * r + 1) * N))
    print(
        orjson.dumps(
            {
                "off_us": statistics.median(off),
                "on_us": statistics.median(on),
                "delta_us": statistics.median(b - a for a, b in zip(off, on, strict=True)),
                "written": requestlog.writer.written,
                "dropped": requestlog.writer.lost,
            }
        ).decode()
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
