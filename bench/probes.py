"""``python -m bench probes``: what writing the watcher's first round over a large fleet
costs the process that writes it — 200 slots of 20 models each (one declared, nineteen more
the server lists), every one found ready — without HTTP around it.

Issue 24: the first round of 200 slots reached the last one 23 s after start, each result a
transaction and a full table reload in every process. Per database (the embedded SQLite, and
PostgreSQL when it is reachable), in a process of its own (``python -m bench.probes URL``,
which prints one JSON object), on an event loop as in a server (the writes in asgiref's
thread, the live feed's events handed to the loop):

- *one by one*: each result written alone, a transaction and a reload each, as every result
  was before the watcher's writes were batched (with today's statements inside: the reloads
  are what it cost);
- *batched*: the round as one batch, one transaction and one reload, which is what results
  that arrive together become (``dispatch.lifecycle.persistence.save``);
- *reload*: one reload of the whole table (4,000 models), what every other process pays per
  change it follows.

CPU is the writing thread's own (``time.thread_time``), so a busy machine swings it less
than the wall time beside it. Writes ``bench/results/probes.md``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.procs import PY, ROOT

SLOTS = 200
MODELS = 20
ROUNDS = 3
PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/test"  # tests/conftest.py's


def _fleet(root: str) -> None:
    from django.db import transaction

    from dispatch.models import Slot, SlotModel

    with transaction.atomic():
        Slot.objects.all().delete()
        slots = Slot.objects.bulk_create(
            Slot(name=f"s{i:03d}", url=f"{root}/s{i:03d}/v1") for i in range(SLOTS)
        )
        SlotModel.objects.bulk_create(
            SlotModel(slot=s, model_id=f"m{i}-0", upstream_model=f"m{i}-0", is_default=True)
            for i, s in enumerate(slots)
        )


def _results(root: str) -> list[tuple[str, Any]]:
    """What the watcher reads of each server on its first probe (tests/fakes.py's llama.cpp
    listing), and what asking it found it speaks."""
    from dispatch.lifecycle.probe import Observation
    from dispatch.routing import speaks

    out = []
    for i in range(SLOTS):
        ids = tuple(f"m{i}-{j}" for j in range(MODELS))
        details = {
            m: {
                "created": int(time.time() * 1000),
                "owned_by": "llamacpp",
                "context_length": 4096,
                "capabilities": ["completion"],
                "meta": {"n_ctx_train": 4096, "server": f"s{i:03d}"},
            }
            for m in ids
        }
        url = f"{root}/s{i:03d}/v1"
        obs = Observation(
            "ready",
            "",
            ids,
            details=details,
            spoken={"messages": True, "responses": True},
            spoken_for=speaks.key("llamacpp", "llm", url),
        )
        out.append((f"s{i:03d}", obs))
    return out


async def _timed(fn: Any, *args: Any) -> tuple[float, float]:
    """``fn(*args)`` in asgiref's thread, as the watcher's writes run: (CPU s, wall s)."""
    from asgiref.sync import sync_to_async

    def run() -> float:
        began = time.thread_time()
        fn(*args)
        return time.thread_time() - began

    began = time.perf_counter()
    cpu = await sync_to_async(run, thread_sensitive=True)()
    return cpu, time.perf_counter() - began


async def _measure() -> dict[str, Any]:
    from asgiref.sync import sync_to_async
    from django.core.management import call_command

    from dispatch.coordination import events
    from dispatch.coordination.store import store
    from dispatch.lifecycle import persistence

    events.bind_loop(asyncio.get_running_loop())
    await sync_to_async(call_command, thread_sensitive=True)("migrate", verbosity=0)
    root = "http://127.0.0.1:9"
    results = _results(root)

    def one_by_one() -> None:
        for name, obs in results:
            persistence.apply(name, obs)  # each commit reloads (sync.committed)

    # ``apply`` is every version's; ``apply_all`` (a batch) is issue 24's.
    runs: list[tuple[str, Any, tuple[Any, ...]]] = [("one_by_one", one_by_one, ())]
    if hasattr(persistence, "apply_all"):
        runs.insert(0, ("batched", persistence.apply_all, (results,)))
    figures: dict[str, list[tuple[float, float]]] = {}
    for r in range(ROUNDS):
        for name, fn, args in runs:
            if name == "one_by_one" and r:
                continue  # 200 reloads: once is enough to see what they cost
            await sync_to_async(_fleet, thread_sensitive=True)(root)
            await sync_to_async(store.reload, thread_sensitive=True)()
            figures.setdefault(name, []).append(await _timed(fn, *args))
            await asyncio.sleep(0.2)  # the live feed's events go out
        figures.setdefault("reload", []).append(await _timed(store.reload))
    table = store.table
    assert all(s.state == "ready" and len(s.models) == MODELS for s in table.slots.values())
    return {
        k: {
            "cpu_s": statistics.median(c for c, _ in v),
            "wall_s": statistics.median(w for _, w in v),
        }
        for k, v in figures.items()
    }


def child(db_url: str) -> int:
    with tempfile.TemporaryDirectory() as data:
        os.environ.update(
            DATABASE_URL=db_url or f"sqlite:///{data}/db.sqlite3",
            HAL0_DATA_DIR=data,
            HAL0_ENV_FILE="/nonexistent",
            DJANGO_SETTINGS_MODULE="hal0web.settings",
        )
        os.environ.pop("REDIS_URL", None)
        import django

        django.setup()
        print(orjson.dumps(asyncio.run(_measure())).decode())
    return 0


def _run_child(db_url: str) -> dict[str, Any]:
    out = subprocess.run(
        [PY, "-m", "bench.probes", db_url],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return orjson.loads(out.stdout.strip().splitlines()[-1])


def _pg_database() -> tuple[str, Any] | None:
    try:
        import psycopg
    except ImportError:
        return None
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        return None
    name = f"hal0_bench_probes_{os.getpid()}"
    admin.execute(f'CREATE DATABASE "{name}"')
    return f"postgres://postgres@127.0.0.1:5432/{name}", (admin, name)


def run() -> str:
    rows = [("SQLite", _run_child(""))]
    pg = _pg_database()
    if pg is not None:
        url, (admin, name) = pg
        try:
            rows.append(("PostgreSQL", _run_child(url)))
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()
    load = Path("/proc/loadavg").read_text().split()[0]
    lines = [
        f"# The first probe round's writes: {SLOTS} slots x {MODELS} models",
        "",
        f"CPU of the writing thread (wall beside it), medians of {ROUNDS} rounds (one by one:",
        f"one round); load average at the end {load}.",
        "",
        "| database | one by one (a transaction and a reload each) | batched (one) | one reload |",
        "|---|---|---|---|",
    ]
    for db, r in rows:
        cells = [
            f"{r[k]['cpu_s']:.2f} s ({r[k]['wall_s']:.2f} s)" if k in r else "-"
            for k in ("one_by_one", "batched", "reload")
        ]
        lines.append(f"| {db} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(child(sys.argv[1] if len(sys.argv) > 1 else ""))
