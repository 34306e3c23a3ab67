"""The watcher's first probe round over a large fleet: 200 slots of 20 models each (one
declared, nineteen found), every one probed and its state written within 3 s (issue 24: it
took 23 s, each result its own transaction and a full table reload in every process)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from dispatch.coordination.store import store
from dispatch.lifecycle.watcher import watcher
from dispatch.models import Slot
from dispatch.upstream.client import upstream
from tests.fake_fleet import FleetProcess
from tests.polling import await_until, wait_until
from tests.processes import Hal0Process, manage, redis_url_or_skip, server_env

SLOTS = 200
MODELS = 20
ROUND_S = 3.0  # what issue 24 asks of the first round


@pytest.fixture(scope="module")
def fleet() -> Iterator[FleetProcess]:
    """The fleet's servers, in a process of their own: the test's interpreter runs the
    watcher and nothing else."""
    fleet = FleetProcess(SLOTS, MODELS)
    yield fleet
    fleet.stop()


# Every slot and its declared default model (its server lists 19 more), in one transaction.
# Run here (the test's database) and in a shell (the processes' database): {root}, {enabled}.
ADD_FLEET = """\
from django.db import transaction
from dispatch.models import Slot, SlotModel
with transaction.atomic():
    slots = Slot.objects.bulk_create(
        Slot(name=f"s{{i:03d}}", url=f"{root}/s{{i:03d}}/v1", enabled={enabled})
        for i in range({slots})
    )
    SlotModel.objects.bulk_create(
        SlotModel(slot=s, model_id=f"m{{i}}-0", upstream_model=f"m{{i}}-0", is_default=True)
        for i, s in enumerate(slots)
    )
"""


def add_fleet(root: str, enabled: bool) -> str:
    return ADD_FLEET.format(root=root, enabled=enabled, slots=SLOTS)


async def test_the_first_round_over_200_slots_ends_within_3_s(
    transactional_db: None, fleet: FleetProcess
) -> None:
    """The watcher in this process, on the embedded SQLite: from its start, every slot
    probed (and asked what it speaks), and its state and models written and in the table."""
    await sync_to_async(exec)(add_fleet(fleet.url, True), {})
    await store.ensure_loaded()

    def all_ready() -> bool:
        slots = store.table.slots.values()
        return len(slots) == SLOTS and all(
            s.state == "ready" and len(s.models) == MODELS for s in slots
        )

    began = time.monotonic()
    watcher.start()
    try:
        await await_until(all_ready, "every slot ready with its 20 models", ROUND_S)
        print(f"first round: {time.monotonic() - began:.2f} s")
    finally:
        await watcher.stop()
        await upstream.aclose()
    written = Slot.objects.filter(state="ready", models__source="discovered")
    assert await written.distinct().acount() == SLOTS


IMPORTS = (
    "from django.db import transaction; from dispatch.coordination import sync; "
    "from dispatch.models import Slot"
)
ENABLE = "with transaction.atomic(): Slot.objects.update(enabled=True); sync.reload_after_commit()"


def _all_ready(worker: Hal0Process) -> bool:
    states = httpx.get(worker.url + "/healthz", timeout=5).json()["slots"]
    return list(states.values()) == ["ready"] * SLOTS


def _listed(worker: Hal0Process) -> dict[str, dict]:
    listed = httpx.get(worker.url + "/v1/models", timeout=10).json()["data"]
    return {m["id"]: m for m in listed}


@pytest.mark.postgres
@pytest.mark.redis
def test_two_workers_on_postgresql_both_hold_the_first_round_within_3_s(
    tmp_path: Path, fleet: FleetProcess, pg_url: str
) -> None:
    """The production shape: two workers (one leads the watcher), PostgreSQL and Redis. The
    fleet is enabled in one statement once both run, so the round begins at a known moment;
    the other worker holds every result too, within the same 3 s."""
    env = server_env(tmp_path, DATABASE_URL=pg_url, REDIS_URL=redis_url_or_skip())
    manage(env, "migrate", "-v0")
    manage(env, "shell", "-c", add_fleet(fleet.url, False))
    workers = [Hal0Process(env, tmp_path / f"worker-{i}.log") for i in (1, 2)]
    shell = subprocess.Popen(
        [sys.executable, "-m", "tests.line_shell"],
        cwd=settings.BASE_DIR,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert shell.stdin is not None and shell.stdout is not None
    shell.stdin.write(f"{IMPORTS}\n")
    shell.stdin.flush()
    assert shell.stdout.readline().strip() == "done"
    try:
        for w in workers:
            w.wait_ready()

        def leaders() -> int:
            return sum("leads the watcher" in w.log() for w in workers)

        wait_until(leaders, "a worker to lead the watcher", 10)
        began = time.monotonic()
        # One statement, announced as any change is (dispatch.coordination.sync.committed).
        shell.stdin.write(f"{ENABLE}\n")
        shell.stdin.flush()
        assert shell.stdout.readline().strip() == "done"
        for w in workers:
            left = began + ROUND_S - time.monotonic()
            wait_until(partial(_all_ready, w), f"every slot ready on {w.url}", left, 0.1)
        print(f"first round on both workers: {time.monotonic() - began:.2f} s")
        # Every model too, everywhere (asked once: a listing of 4,000 is no poll), with what
        # its server said of it, and what the slot's server was found to speak.
        for w in workers:
            listed = _listed(w)
            assert len(listed) == SLOTS * MODELS
            found = listed[f"m{SLOTS - 1}-{MODELS - 1}"]
            assert found["context_length"] == 4096 and found["status"] == {"value": "loaded"}
            [slot] = found["hal0"]["slots"]
            assert slot["source"] == "discovered" and slot["endpoints_from"] == "server"
        assert leaders() == 1
        for w in workers:
            # A reload that changed 200 slots is 200 events for its pages: sent in turn, not
            # 200 at once from the reloading thread (redis-py's pool of 100 ran dry).
            unsent = [line for line in w.log().splitlines() if "could not broadcast" in line]
            assert not unsent, unsent[0]
    finally:
        shell.stdin.close()
        shell.wait(10)
        shell.stdout.close()
        for w in workers:
            w.stop()
