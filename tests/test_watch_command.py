"""`manage.py watch` probes on its own, writes states to the database, and stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes import FakeUpstream, ServerThread
from tests.polling import wait_until

ROOT = Path(__file__).resolve().parent.parent


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


@pytest.fixture
def fake():
    f = FakeUpstream("w", models=["m1"])
    server = ServerThread(f).start()
    yield f, server
    server.stop()


def test_watch_runs_standalone_and_stops_cleanly_on_sigterm(tmp_path, fake):
    f, server = fake
    env = {
        **os.environ,
        "HAL0_DATA_DIR": str(tmp_path),
        "HAL0_PROBE_INTERVAL_S": "0.2",
        "HAL0_ENV_FILE": "/nonexistent",
        "DATABASE_URL": f"sqlite:///{tmp_path}/db.sqlite3",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    manage(env, "migrate", "-v0")
    manage(
        env,
        "shell",
        "-c",
        (
            "from dispatch.models import Slot, SlotModel;"
            f"s = Slot.objects.create(name='w', url='{server.url}/v1');"
            "SlotModel.objects.create(slot=s, model_id='m1', is_default=True)"
        ),
    )
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "watch"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        db = sqlite3.connect(tmp_path / "db.sqlite3")

        def state() -> str:
            return db.execute("select state from dispatch_slot where name='w'").fetchone()[0]

        wait_until(lambda: state() == "ready", "slot w to be ready", 20, show=state)
        f.health = "loading"
        wait_until(lambda: state() == "loading", "slot w to be loading", 10, show=state)
        db.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "watcher stopped" in out
    assert "Traceback" not in err
